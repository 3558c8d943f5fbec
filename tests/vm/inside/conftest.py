"""Tests here run only inside the VM that tests/vm/test_vm.py boots (it sets
SLICEPROXY_IN_VM=1); on the host they are not collected at all, rather than
reported as skips: the host-side test_vm.py is what runs them."""

import os

if os.environ.get("SLICEPROXY_IN_VM") != "1":
    collect_ignore_glob = ["test_*.py"]
