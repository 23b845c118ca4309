import sys

from trainer.models.tiny import main

sys.exit(main())
