"""fedgen: differentially private generative models, centrally or federated, with honest privacy accounting."""

__version__ = "0.1.0"

from fedgen.errors import ConfigError, DataNotFoundError, PrivacyBudgetExceeded  # noqa: E402

__all__ = ["ConfigError", "DataNotFoundError", "PrivacyBudgetExceeded", "__version__"]
