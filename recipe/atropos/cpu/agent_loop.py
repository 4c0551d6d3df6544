"""An agent-loop manager for runs whose rollouts come from Atropos environments.

verl's trainer builds an agent-loop manager to generate training rollouts; here
environments generate, so on the CPU backend (where verl's own agent loop has no
engine to drive) this stands in its place. It generates nothing, and says so if
verl's validation asks it to: validate with the GPU backend or turn validation off.
"""

from __future__ import annotations


class AtroposAgentLoopManager:
    def __init__(self, config=None, llm_client=None, **kwargs):
        self.config = config
        self.llm_client = llm_client

    @classmethod
    def create(cls, *args, **kwargs):
        return cls(*args, **kwargs)

    def generate_sequences(self, prompts):
        raise NotImplementedError(
            "the CPU backend serves Atropos environments through its HTTP server and has no verl agent loop; "
            "set trainer.test_freq=-1 and trainer.val_before_train=false, or validate with rollout.name=vllm"
        )
