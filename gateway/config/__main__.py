"""`python -m gateway.config PATH`: the child process of `gateway.config.isolated`.

Writes the pickled answer for the config at PATH (read with this process's environment) to
stdout; the parent turns it back into a `Config` or a `ConfigError`.
"""

import os
import sys

from gateway.config.isolated import answer_for

if len(sys.argv) != 2:
    sys.exit("usage: python -m gateway.config PATH")
# Below the workers that serve requests: when the CPUs are busy, the requests go first and
# the reload waits, not the other way round.
os.nice(10)
sys.stdout.buffer.write(answer_for(sys.argv[1], os.environ))
sys.stdout.buffer.flush()
