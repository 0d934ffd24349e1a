"""Paper experiments, one module each, run by the ``diffmpc`` command and the scripts in examples/."""
