"""Request bodies of the trajectory API: the fields and types of atroposlib 0.4.0's protocol.

Two optional additions, ignored by ``run-api`` if sent to it: ``vocab_size`` in
``/register`` (token ids at or above it are refused) and ``policy_version`` in a
scored group (the trainer step whose weights generated it; batches are formed
oldest version first).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator


class Registration(BaseModel):
    wandb_group: str
    wandb_project: str
    batch_size: int = Field(gt=0)
    max_token_len: int
    checkpoint_dir: str
    save_checkpoint_interval: int
    starting_step: int
    num_steps: int
    vocab_size: int | None = Field(default=None, gt=0)


class RegisterEnv(BaseModel):
    max_token_length: int
    desired_name: str
    weight: float
    group_size: int = Field(gt=0)
    # least share of every batch this environment gets (0..1)
    min_batch_allocation: float | None = Field(default=None, ge=0.0, le=1.0)


class EnvIdentifier(BaseModel):
    env_id: int


class ScoredData(BaseModel):
    """One scored group: ``tokens``, ``masks`` and ``scores`` per sequence, the rest optional."""

    tokens: list[list[int]]
    masks: list[list[int]]
    scores: list[float]
    advantages: list[list[float]] | None = None
    ref_logprobs: list[list[float]] | None = None
    messages: list[list[dict[str, Any]]] | None = None
    generation_params: dict[str, Any] | None = None
    inference_logprobs: list[list[float]] | None = None
    overrides: list[dict] | None = None
    group_overrides: dict | None = None
    images: Any | None = None
    env_id: int | None = None
    distill_token_ids: list[list[list[int]]] | None = None
    distill_logprobs: list[list[list[float]]] | None = None
    policy_version: int | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def messages_have_role_and_content(cls, value):
        # a chat message needs a role and a content; anything else it carries (reward, ...) is kept
        for conversation in value or ():
            for message in conversation:
                if not isinstance(message, dict) or "role" not in message or "content" not in message:
                    raise ValueError("every message must be an object with 'role' and 'content'")
        return value

    def as_group(self) -> dict[str, Any]:
        """The group as queued and served: every protocol field (None where absent);
        ``policy_version`` only where it was given."""
        group = self.model_dump(exclude={"policy_version"})
        if self.policy_version is not None:
            group["policy_version"] = self.policy_version
        return group
