"""The federation: simulated clients, client sampling, and federated private releases."""

from fedgen.federated.clients import Client, ClientSampler, dataset_labels, make_clients
from fedgen.federated.release import FederatedRelease

__all__ = ["Client", "ClientSampler", "FederatedRelease", "dataset_labels", "make_clients"]
