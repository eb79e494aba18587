"""State dicts in and out of `ZayaForCausalLM`: one strict check and one build on the meta device.

    from zaya_train.model.state import check_state_dict, model_from_state_dict
    check_state_dict(state, model, source="ckpt/")      # names every missing, unexpected or misshapen tensor
    model = model_from_state_dict(config, state, source="ckpt/")   # no random init, tensors assigned as given

Every loader of the package (HF directories, trainer checkpoints, the rollout engine's weight sync) goes through
these two, so a checkpoint that does not fit its config fails the same way wherever it is read, never by a
silent drop. With tied embeddings a state dict may omit `lm_head.weight` (HF exports do); one that holds it must
hold the embedding's values.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from zaya_train.model.config import ZayaConfig
from zaya_train.model.model import ZayaForCausalLM

HEAD = "lm_head.weight"
EMBED = "model.embed_tokens.weight"


def _name_list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_state_dict(
    state: Mapping[str, torch.Tensor], model: ZayaForCausalLM, source: str
) -> dict[str, torch.Tensor]:
    """`state` with a tied head filled in from the embedding; raises ValueError naming every tensor that is
    missing, unexpected or of the wrong shape for `model` (which may live on the meta device)."""
    state = dict(state)
    if model.config.tie_word_embeddings and EMBED in state:
        head = state.get(HEAD)
        if head is None:
            state[HEAD] = state[EMBED]
        elif head.shape != state[EMBED].shape or not torch.equal(head, state[EMBED]):
            raise ValueError(f"{source}: {HEAD} differs from {EMBED}, but the config ties them")
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(
        f"{name} {tuple(state[name].shape)} (expected {expected[name]})"
        for name in set(expected) & set(state)
        if tuple(state[name].shape) != expected[name]
    )
    problems = [
        f"{what} tensors: {_name_list(names)}"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen))
        if names
    ]
    if problems:
        raise ValueError(f"{source} does not match its zaya config: " + "; ".join(problems))
    return state


def model_from_state_dict(
    config: ZayaConfig, state: Mapping[str, torch.Tensor], source: str, device: torch.device | str = "cpu"
) -> ZayaForCausalLM:
    """A model holding exactly `state`'s tensors (checked by `check_state_dict`), built on the meta device so
    no random weights are ever allocated; the rotary tables are computed on `device`."""
    with torch.device("meta"):
        model = ZayaForCausalLM(config)
    model.load_state_dict(check_state_dict(state, model, source), strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.materialize_rope(device)
    return model
