"""HTTP load test against a running server; same as `trieserve loadtest`.

python bench/loadtest.py --base-url http://127.0.0.1:8000 --dataset copy --sweep-concurrency 1,2,4 --compare
python bench/loadtest.py --help
"""

import sys

from trieserve.server.loadtest import main

if __name__ == "__main__":
    sys.exit(main())
