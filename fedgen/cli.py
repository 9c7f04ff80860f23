"""The ``fedgen`` command line: ``fedgen <command> [options]``, each command in a module of its own.

    fit        fedgen.cli_fit        the generative-privacy pipeline (LightningCLI underneath)
    sample     fedgen.cli_sample     more synthetic data from a finished fit run
    federate   fedgen.cli_federate   the federated-learning baseline (FedAvg, FedProx, DP-FedAvg)
    audit, attack, membership        fedgen.cli_attacks

This module imports none of them until a command runs, so ``fedgen --help`` and a mistyped command answer at
once instead of after the seconds that torch and Lightning take to load. From Python, ``fedgen.cli.fit(args)``
(and each other command by its name) runs the command on a list of arguments and returns its report.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any

from fedgen.errors import ConfigError, DataNotFoundError, PrivacyBudgetExceeded

log = logging.getLogger("fedgen")

#: each command's module
COMMANDS = {"fit": "fedgen.cli_fit", "sample": "fedgen.cli_sample", "federate": "fedgen.cli_federate",
            "audit": "fedgen.cli_attacks", "attack": "fedgen.cli_attacks", "membership": "fedgen.cli_attacks"}

USAGE = """usage: fedgen <command> [options]

commands:
  fit       train a private generator, synthesize data, train and test a classifier on it
            (fedgen fit --config examples/mnist_dp_merf.yaml; fedgen fit --help for all options)
  sample    draw a labelled synthetic dataset from a finished fit run's generator (post-processing); with
            --evaluate true, score it as fit scores its own   (fedgen sample --run runs/<fit run> --num 60000)
  federate  train a classifier directly across clients (FedAvg, FedProx, DP-FedAvg), test it on real data
            (fedgen federate --config examples/federated_mnist_dp_fedavg.yaml)
  audit     audit DP-SGD in one run with canaries: an empirical lower bound on epsilon beside the claim
            (fedgen audit --config examples/audit_dp_sgd.yaml)
  attack    reconstruct a client's images from what it sends: a gradient, a DP-SGD update, or the generative
            pipeline's release (DLG, Inverting Gradients)
            (fedgen attack --config examples/attack_gradient_inversion.yaml)
  membership  membership inference against what a fit run released (its synthetic data; a DP diffusion
            generator's weights)   (fedgen membership --run runs/<fit run>)
"""


def __getattr__(name: str) -> Callable[[list[str]], Any]:
    """``fedgen.cli.<command>``: the command's function, imported from its module on first use."""
    if name not in COMMANDS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(COMMANDS[name]), name)


def _configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s fedgen: %(message)s", datefmt="%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> None:
    """The ``fedgen`` console command on ``argv`` (default: the process's arguments): a configuration error or a
    missing dataset exits with status 2 after one line that names the field and the fix, a refused release
    (the privacy budget spent) with status 3."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _configure_logging()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        print(f"fedgen: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    command = getattr(sys.modules[__name__], argv[0])  # torch and Lightning load here, for a known command
    try:
        command(argv[1:])
    except (ConfigError, DataNotFoundError) as err:
        print(f"fedgen: error: {err}", file=sys.stderr)
        sys.exit(2)
    except PrivacyBudgetExceeded as err:
        print(f"fedgen: stopped: {err}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
