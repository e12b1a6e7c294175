"""The compiled model: torch.compile with every graph it builds counted, by mode; and the count of
every graph this process has compiled, to show that none is compiled inside the timed run.

Training graphs are traced with gradients enabled, validation graphs under no_grad, so the mode of a
graph is read from autograd's state when Dynamo hands it over. A run that passes its window as a
tensor builds one graph per mode (model/gpt.py).
"""

from dataclasses import dataclass

import torch
from torch._dynamo.utils import counters


@dataclass(eq=False)  # compared and hashed by identity, as a function backend is
class GraphCount:
    """A torch.compile backend: counts each graph Dynamo builds, then compiles it with `backend`."""

    backend: str = "inductor"
    training: int = 0
    validation: int = 0

    def __call__(self, graph: "torch.fx.GraphModule", example_inputs: list):
        if torch.is_grad_enabled():
            self.training += 1
        else:
            self.validation += 1
        return torch._dynamo.lookup_backend(self.backend)(graph, example_inputs)

    @property
    def total(self) -> int:
        return self.training + self.validation


def compile_model(model: torch.nn.Module, backend: str) -> tuple[torch.nn.Module, GraphCount]:
    """(torch.compile(model, dynamic=False) through a GraphCount of `backend`, that count).

    dynamic=False: every shape is a constant of its graph, as the record compiles; the window, a
    0-dim tensor, is not a shape, so its value never asks for another graph.
    """
    graphs = GraphCount(backend)
    return torch.compile(model, dynamic=False, backend=graphs), graphs


def graphs_compiled() -> int:
    """Graphs Dynamo has built in this process so far, over every torch.compile'd function: the model's
    and, on CUDA, Newton-Schulz's (one per stack shape)."""
    return counters["stats"]["unique_graphs"]
