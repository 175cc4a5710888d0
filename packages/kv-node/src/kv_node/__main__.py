import sys

from kv_node.main import main

sys.exit(main())
