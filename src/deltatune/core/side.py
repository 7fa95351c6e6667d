"""Where a side network sits: the module whose output is the final hidden state, and the blocks
whose inputs feed its ladder.

A side network (``methods.side``: LST, QST) changes one hidden state only — the backbone's
final one, as the head reads it — and reads the residual stream entering each block of the
block list before it (``Delta.taps``). Nothing it adds flows back into a backbone block, so the
backbone is never back-propagated through. This module finds those positions on any model
with a repeated block list (``targeting.find_block_lists``):

* the output module: by default the first normalisation layer after the last block list (Llama
  ``model.norm``, GPT-2 ``transformer.ln_f``, ViT ``vit.layernorm``, T5's decoder
  ``final_layer_norm``); in post-norm models without one (BERT, RoBERTa), the last block's
  final norm (``output.LayerNorm``), provided no parameterised layer follows it in the block;
  or the one module the user's ``targets`` name;
* the taps: the blocks of the block list that precedes the output module (optionally a subset:
  ``layers``), each read at its input — embeddings for the first block, then every block's
  output.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import TargetError
from .targeting import Matcher

#: ``targets`` value meaning "the module whose output is the final hidden state".
FINAL_HIDDEN = "final-hidden"


def _is_output_norm(matcher: Matcher, name: str) -> bool:
    info = matcher.info(name)
    return info is not None and info.kind == "norm" and not info.channels_first


def _subtree(matcher: Matcher, root: str) -> list[str]:
    return [n for n in matcher.names if n.startswith(root + ".")]


def output_module(matcher: Matcher, targets: Sequence[str] | str | None) -> str:
    """The logical path of the one module a side network adds its output to.

    Args:
        matcher: the model's matcher.
        targets: ``None`` / ``FINAL_HIDDEN`` (find it), or the user's target spec, which must
            select exactly one normalisation layer.

    Returns:
        The module's canonical path.

    Raises:
        TargetError: no block list, no final norm found, or ``targets`` selecting nothing, a
            non-norm module or several modules.
    """
    if targets is None or targets == FINAL_HIDDEN or tuple(targets) == (FINAL_HIDDEN,):
        return _default_output(matcher)
    hits = {matcher.canonical(n) for group in matcher.select(targets, "targets") for n in group}
    norms = sorted(n for n in hits if _is_output_norm(matcher, n))
    if len(norms) != 1:
        raise TargetError(
            f"a side network adds its output at one module, the normalisation layer whose "
            f"output is the final hidden state (e.g. Llama's 'model.norm'); targets={targets!r} "
            f"selects {len(norms)} such layers{f' ({norms[:4]} …)' if norms else ''}. Leave "
            "targets unset to find it, or name that one layer")
    return norms[0]


def _default_output(matcher: Matcher) -> str:
    model = type(matcher.model).__name__
    if not matcher.block_lists:
        raise TargetError(f"a side network taps the blocks of a repeated block list, and "
                          f"{model} has none (no ModuleList of identical blocks)")
    last = matcher.block_lists[-1]
    inside = _subtree(matcher, last)
    after = matcher.names[matcher.names.index(inside[-1]) + 1:]
    for name in after:
        if _is_output_norm(matcher, name) and matcher.canonical(name) == name:
            return name
    block = f"{last}.{len(matcher.modules[last]) - 1}"
    norms = [n for n in _subtree(matcher, block) if _is_output_norm(matcher, n)]
    if norms:  # post-norm blocks: the last norm ends the block if nothing trainable follows
        rest = _subtree(matcher, block)[_subtree(matcher, block).index(norms[-1]) + 1:]
        if not any(any(True for _ in matcher.modules[n].parameters(recurse=False))
                   for n in rest):
            return norms[-1]
    raise TargetError(f"cannot tell which module of {model} outputs the final hidden state (no "
                      f"normalisation layer after {last!r}, and its last block does not end "
                      "with one); name it in targets=[...]")


def ladder_taps(matcher: Matcher, output: str, layers: Sequence[int] | None) -> tuple[str, ...]:
    """The blocks whose inputs feed the ladder, in order: those of the block list before
    ``output`` (or holding it in its last block), all or the indices in ``layers``.

    Raises:
        TargetError: no block list before ``output``; ``output`` inside a block followed by
            others (their backward would run through the backbone); ``layers`` out of range.
    """
    names = matcher.names
    at = names.index(output)
    chosen = None
    for blocks in matcher.block_lists:
        inside = _subtree(matcher, blocks)
        if output in inside:
            size = len(matcher.modules[blocks])
            index = int(output[len(blocks) + 1:].split(".")[0])
            if index != size - 1:
                raise TargetError(
                    f"{output!r} lies in block {index} of {blocks!r}, which has {size}: the side "
                    "network's output would flow through the blocks after it, and training "
                    "would back-propagate through them; target the last block's output norm "
                    "or the final norm")
            chosen = blocks
        elif inside and names.index(inside[-1]) < at:
            chosen = blocks
    if chosen is None:
        raise TargetError(f"no block list runs before {output!r}; a side network reads the "
                          "blocks' hidden states, so target a module after them")
    size = len(matcher.modules[chosen])
    indices = list(range(size))
    if layers is not None:
        bad = [i for i in layers if not -size <= i < size]
        if bad:
            raise TargetError(f"ladder layers {bad} out of range for {chosen!r}, which has "
                              f"{size} blocks (valid: 0..{size - 1} or negative from the end)")
        indices = sorted({i % size for i in layers})
    return tuple(f"{chosen}.{i}" for i in indices)


__all__ = ["FINAL_HIDDEN", "ladder_taps", "output_module"]
