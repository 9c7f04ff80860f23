"""The federation: simulated clients, client sampling, and federated private releases."""

from fedgen.federated.clients import Client, ClientSampler, dataset_labels, make_clients
from fedgen.federated.dp_sgd import ClientTagged, FederatedDPSGD
from fedgen.federated.loop import FederatedTrainer
from fedgen.federated.release import FederatedRelease
from fedgen.federated.strategy import ClientLevelDP, FedAvg, FedProx, Strategy

__all__ = [
    "Client",
    "ClientLevelDP",
    "ClientSampler",
    "ClientTagged",
    "FedAvg",
    "FedProx",
    "FederatedDPSGD",
    "FederatedRelease",
    "FederatedTrainer",
    "Strategy",
    "dataset_labels",
    "make_clients",
]
