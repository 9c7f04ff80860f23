"""The federation: simulated clients, client sampling, and federated private releases."""

from fedgen.federated.clients import Client, ClientSampler, dataset_labels, make_clients

__all__ = ["Client", "ClientSampler", "dataset_labels", "make_clients"]
