"""GDB control: a pygdbmi session (:mod:`.session`) and the stdlib-only in-gdb agent."""
