"""Vision-language masks vs a token-by-token transcription of the rules (True = may attend)."""
from __future__ import annotations

import random

import pytest
import torch

from causalfusion.masks import multimodal_mask


def reference(layout: str, groups: list[int], text_len: int, transfusion: bool = False) -> torch.Tensor:
    """text_first: [text | clean steps 1..S-1 | noisy]; image_first: [clean steps 1..S | noisy | text]."""
    text = [("text", i) for i in range(text_len)]
    clean_steps = groups if layout == "image_first" else groups[:-1]
    clean = [("clean", s) for s, g in enumerate(clean_steps) for _ in range(g)]
    noisy = [("noisy", s) for s, g in enumerate(groups) for _ in range(g)]
    tokens = text + clean + noisy if layout == "text_first" else clean + noisy + text
    n = len(tokens)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i, (qk, qs) in enumerate(tokens):
        for j, (kk, ks) in enumerate(tokens):
            if qk == "text":  # causal over text; image-first captions also read the image
                ok = (kk == "text" and ks <= qs) or (
                    layout == "image_first" and kk == ("noisy" if transfusion else "clean"))
            elif qk == "clean":
                ok = (kk == "text" and layout == "text_first") or (kk == "clean" and ks <= qs)
            else:
                ok = ((kk == "text" and layout == "text_first") or (kk == "clean" and ks < qs)
                      or (kk == "noisy" and ks == qs))
            m[i, j] = ok
    return m


@pytest.mark.parametrize("layout", ["text_first", "image_first"])
@pytest.mark.parametrize("transfusion", [False, True])
def test_matches_reference(layout, transfusion):
    rng = random.Random(0)
    for groups in ([6], [1, 5], [2, 2, 2], [1] * 6, [3, 1, 2]):
        for text_len in (1, 3, 5):
            got = multimodal_mask(layout, groups, text_len, transfusion)
            assert torch.equal(got, reference(layout, groups, text_len, transfusion)), (groups, text_len)
    groups = [rng.randint(1, 4) for _ in range(5)]
    assert torch.equal(multimodal_mask(layout, groups, 7, transfusion), reference(layout, groups, 7, transfusion))


def test_rules_spelled_out():
    groups, tl, num_tokens = [2, 3, 3], 4, 8
    # text never sees later text, in both layouts
    tf = multimodal_mask("text_first", groups, tl)
    assert torch.equal(tf[:tl, :tl], torch.ones(tl, tl, dtype=torch.bool).tril())
    assert not tf[:tl, tl:].any()  # text-first: text sees no image token
    assert tf[tl:, :tl].all()  # every image token sees all text
    for transfusion in (False, True):
        im = multimodal_mask("image_first", groups, tl, transfusion)
        text_rows = im[-tl:]
        assert torch.equal(text_rows[:, -tl:], torch.ones(tl, tl, dtype=torch.bool).tril())
        clean, noisy = text_rows[:, :num_tokens], text_rows[:, num_tokens:2 * num_tokens]
        if transfusion:  # captions condition on the noised image only
            assert noisy.all() and not clean.any()
        else:  # CausalFusion: all clean tokens (last step included), no noisy ones
            assert clean.all() and not noisy.any()
        assert not im[:2 * num_tokens, -tl:].any()  # no image token sees the caption


def test_bad_layout():
    with pytest.raises(ValueError, match="layout"):
        multimodal_mask("side_by_side", [4], 3)
    with pytest.raises(ValueError, match="text length"):
        multimodal_mask("text_first", [4], 0)
