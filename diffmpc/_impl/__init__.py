"""Private internals shared by the public modules (no stability promise; import from ``diffmpc`` instead).

=================  ========================================================================================
``batch``          per-sample reductions on ``(B, *S)`` batches (dot, norm, broadcasting), failure messages
``tolerances``     the one table of default tolerances by dtype
``linesearch``     the one batched Armijo backtracking line search
``krylov``         the batched Krylov kernels (CG, MINRES, CGNR, GMRES, dense) and the true-residual check
``ift``            the one implicit-function-theorem front end: adjoint operator, strategy dispatch, VJP
=================  ========================================================================================
"""
