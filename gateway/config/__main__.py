"""`python -m gateway.config PATH`: the child process of `gateway.config.isolated`.

Writes the pickled answer for the config at PATH (read with this process's environment) to
stdout; the parent turns it back into a `Config` or a `ConfigError`.
"""

import os
import sys

from gateway.config.isolated import answer_for

if len(sys.argv) != 2:
    sys.exit("usage: python -m gateway.config PATH")
sys.stdout.buffer.write(answer_for(sys.argv[1], os.environ))
sys.stdout.buffer.flush()
