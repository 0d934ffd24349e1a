"""``python -m envs --seed 0``: accuracy and speed of the cart-pole integrator (see ``cartpole_dynamics``)."""

from .cartpole_swingup import _accuracy_report

if __name__ == "__main__":
    _accuracy_report()
