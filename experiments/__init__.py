"""The paper's reproductions, one module each (Kepler Fig. 1, LQR imitation, Table 1, Table 2 / Fig. 3).

This package sits above the library (:mod:`diffmpc`), the environments (:mod:`envs`) and the agents
(:mod:`agents`) and below the command line (:mod:`diffmpc.cli`), which dispatches to each module's
``register(subparsers)``.
"""
