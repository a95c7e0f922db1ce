"""Rendered attribute x object shapes (leanfm.data.shapes): held-out combinations, seeded rendering."""

import torch

from leanfm.data import shapes


def test_shapes_hold_out_combinations_but_no_attribute_value():
    train, test = shapes.split_combinations(0)
    assert len(train) + len(test) == 180 and not set(train) & set(test) and len(test) == 36
    for k in range(4):
        assert {c[k] for c in train} == {c[k] for c in shapes.all_combinations()}
    assert shapes.split_combinations(0) == (train, test) and shapes.split_combinations(1)[1] != test


def test_shapes_render_deterministically_with_their_captions():
    _, test = shapes.split_combinations(0)
    a, caps = shapes.render_set(test[:2], 3, seed=5)
    b, _ = shapes.render_set(test[:2], 3, seed=5)
    assert torch.equal(a, b) and a.shape == (6, 3, 32, 32) and caps[0] == shapes.caption(test[0])
    assert a.min() >= 0 and a.max() <= 1 and not torch.equal(a[0], a[1])  # jittered per image
    assert shapes.caption(("small", "striped", "red", "triangle")) == "a small striped red triangle"


def _coloured_pixels(size, texture, shape, n=8):
    """Mean count of pixels within 0.12 of pure red in ``n`` renderings of a red shape."""
    images, _ = shapes.render_set([(size, texture, "red", shape)], n, seed=0)
    red = torch.tensor(shapes.COLOURS["red"])[None, :, None, None]
    return float(((images - red).abs().amax(1) < 0.12).float().sum((1, 2)).mean())


def test_rendered_attributes_change_what_is_drawn():
    large, small = _coloured_pixels("large", "solid", "circle"), _coloured_pixels("small", "solid", "circle")
    assert 300 < large < 450 and 80 < small < 160  # about pi r^2 for radius 11 and 6
    assert _coloured_pixels("large", "striped", "circle") < 0.6 * large
    assert _coloured_pixels("large", "dotted", "circle") < 0.3 * large
    square = _coloured_pixels("large", "solid", "square")
    assert _coloured_pixels("large", "solid", "cross") < 0.85 * square  # two arms of a third of the width
    assert _coloured_pixels("large", "solid", "triangle") < 0.8 * square  # half the bounding box
