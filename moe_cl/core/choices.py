"""The core's named choices: gates, output modes, L_s scalings, paper architectures.

They live in a module that imports nothing, so that the run configuration and the command line
can offer and check them without importing torch; the modules that implement them (``gates``,
``mixture``, ``losses``, ``zoo``) take their names from here.
"""

from typing import Literal, get_args

GateKind = Literal["softmax", "attentive"]
OutputMode = Literal["expectation", "stochastic"]
Scaling = Literal["clean", "reference"]  # of L_s: this package's, or the reference code's

GATES: tuple[str, ...] = get_args(GateKind)
OUTPUTS: tuple[str, ...] = get_args(OutputMode)
SCALINGS: tuple[str, ...] = get_args(Scaling)
# The paper's architectures (moe_cl.core.zoo.ARCHITECTURES holds one entry for each).
PAPER_ARCHITECTURES = ("mnist", "fmnist", "cifar100", "cifar100_h256")
