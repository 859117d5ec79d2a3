from store._ops.cli import main
import sys

sys.exit(main())
