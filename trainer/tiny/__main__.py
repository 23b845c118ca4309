import sys

from trainer.tiny import main

sys.exit(main())
