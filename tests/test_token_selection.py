"""select_visual_tokens: scores against float64 / eager references, constructed videos, top-k,
opcheck, bad inputs, CUDA against CPU."""
from __future__ import annotations

import math

import pytest
import torch

from hippo_testing import capture_cuda_graph, rel_error, requires_cuda
from hippo_ext import SelectedTokens, select_visual_tokens
from hippo_ext.token_selection import (
    kept_count,
    reference_fuse,
    reference_global_score,
    reference_local_scores,
    reference_select_visual_tokens,
    reference_top_k,
)

OP = torch.ops.hippo_ext.select_visual_tokens.default


def make_inputs(gen, *, layers=2, q_heads=4, kv_heads=2, num_queries=3, head_dim=16,
                seq_len=None, frames=3, grid_h=4, grid_w=5, channels=24, visual_start=7,
                extra_visual=0, text_after=11, dtype=torch.float32, device="cpu"):
    """Random queries/keys/features; the prompt is [text][visual span][text_after text]."""
    grid_tokens = frames * grid_h * grid_w
    num_visual = grid_tokens + extra_visual
    if seq_len is None:
        seq_len = visual_start + num_visual + text_after
    q = torch.randn(layers, q_heads, num_queries, head_dim, generator=gen)
    k = torch.randn(layers, kv_heads, seq_len, head_dim, generator=gen)
    f = torch.randn(frames, grid_h, grid_w, channels, generator=gen)
    # Scale queries so that the softmax is neither uniform nor one-hot.
    q = q * 1.5
    return dict(queries=q.to(dtype).to(device), keys=k.to(dtype).to(device),
                features=f.to(dtype).to(device), visual_start=visual_start,
                num_visual=num_visual)


def run_op(inputs, num_keep, per_frame=False, weights=(1 / 3, 1 / 3, 1 / 3), scale=None):
    return select_visual_tokens(inputs["queries"], inputs["keys"], inputs["features"],
                                inputs["visual_start"], inputs["num_visual"], num_keep,
                                per_frame=per_frame, weights=weights, scale=scale)


def grid_shape(inputs):
    return tuple(inputs["features"].shape[:3])


# ---- global score ------------------------------------------------------------------------------

@pytest.mark.parametrize("layers,q_heads,kv_heads,num_queries", [
    (1, 2, 2, 1),   # GQA ratio 1, one query
    (3, 7, 1, 5),   # GQA ratio 7, odd Lq, 3 layers
    (2, 14, 2, 4),  # ratio 7 with 2 KV heads
])
def test_global_score_matches_float64_attention(device, gen, layers, q_heads, kv_heads,
                                                num_queries):
    inputs = make_inputs(gen, layers=layers, q_heads=q_heads, kv_heads=kv_heads,
                         num_queries=num_queries, head_dim=16, device=device)
    scale = 0.3
    out = run_op(inputs, num_keep=5, scale=scale)
    ref = reference_global_score(inputs["queries"], inputs["keys"], inputs["visual_start"],
                                 grid_shape(inputs), scale, dtype=torch.float64)
    assert out.global_score.dtype == torch.float32
    assert rel_error(out.global_score, ref) < 1e-5


def test_global_score_causal_mask_on_visual_columns(device, gen):
    """The span reaches the end of the prompt, so the last grid columns are hidden from the
    earlier queries: the result must follow the causal mask."""
    inputs = make_inputs(gen, num_queries=6, text_after=0, device=device)
    out = run_op(inputs, num_keep=3, scale=0.25)
    ref = reference_global_score(inputs["queries"], inputs["keys"], inputs["visual_start"],
                                 grid_shape(inputs), 0.25, dtype=torch.float64)
    assert rel_error(out.global_score, ref) < 1e-5
    # The last grid column is seen by the last query only: its mean mass is at most 1/Lq.
    assert float(out.global_score.flatten()[-1]) <= 1 / 6 + 1e-6


@pytest.mark.parametrize("head_dim", [64, 72, 20])
def test_global_score_several_key_tiles(device, gen, head_dim):
    """Longer prompt (several CUDA key tiles; rows not a multiple of the row chunk)."""
    inputs = make_inputs(gen, layers=1, q_heads=7, kv_heads=1, num_queries=5, head_dim=head_dim,
                         frames=2, grid_h=9, grid_w=11, visual_start=40, text_after=70,
                         device=device)
    scale = 1 / math.sqrt(head_dim)
    out = run_op(inputs, num_keep=10, scale=scale)
    ref = reference_global_score(inputs["queries"], inputs["keys"], inputs["visual_start"],
                                 grid_shape(inputs), scale, dtype=torch.float64)
    assert rel_error(out.global_score, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_global_score_half_inputs(device, gen, dtype):
    inputs = make_inputs(gen, q_heads=4, kv_heads=1, num_queries=3, head_dim=32, dtype=dtype,
                         device=device)
    out = run_op(inputs, num_keep=4, scale=0.2)
    ref = reference_global_score(inputs["queries"], inputs["keys"], inputs["visual_start"],
                                 grid_shape(inputs), 0.2, dtype=torch.float64)
    assert rel_error(out.global_score, ref) < 1e-4


def test_strided_keys_view_of_static_cache(device, gen):
    """keys = cache[:, 0, b, :, :S] of a [layers, 2, B, Hkv, S_max, D] cache, read in place."""
    inputs = make_inputs(gen, layers=2, q_heads=6, kv_heads=3, device=device)
    seq_len, head_dim = inputs["keys"].shape[2], inputs["keys"].shape[3]
    cache = torch.randn(2, 2, 3, 3, seq_len + 17, head_dim, generator=gen).to(device)
    cache[:, 0, 1, :, :seq_len] = inputs["keys"]
    view = cache[:, 0, 1, :, :seq_len]
    assert not view.is_contiguous()
    strided = run_op({**inputs, "keys": view}, num_keep=6)
    dense = run_op(inputs, num_keep=6)
    torch.testing.assert_close(strided.global_score, dense.global_score, rtol=0, atol=0)
    torch.testing.assert_close(strided.kept, dense.kept, rtol=0, atol=0)


# ---- local scores ------------------------------------------------------------------------------

@pytest.mark.parametrize("frames,grid_h,grid_w", [(3, 4, 5), (1, 3, 3), (2, 1, 1), (4, 1, 6)])
def test_local_scores_match_reference(device, gen, frames, grid_h, grid_w):
    inputs = make_inputs(gen, frames=frames, grid_h=grid_h, grid_w=grid_w, channels=33,
                         device=device)
    out = run_op(inputs, num_keep=1)
    temporal, spatial = reference_local_scores(inputs["features"], torch.float64)
    torch.testing.assert_close(out.temporal_score, temporal.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.spatial_score, spatial.float(), rtol=1e-5, atol=1e-6)
    if frames == 1:
        assert bool((out.temporal_score == 0).all())
    if grid_h == grid_w == 1:
        assert bool((out.spatial_score == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 33, 3584])
def test_identical_frames_have_exactly_no_novelty(device, gen, dtype, channels):
    """A static video: novelty exactly 0, not rounding noise that the per-frame min-max
    normalisation would stretch over [0, 1] (then a third of the fused score would be noise).
    Frames 0-2 are identical, frame 3 differs."""
    inputs = make_inputs(gen, frames=4, grid_h=3, grid_w=5, channels=channels, dtype=dtype,
                         device=device)
    features = inputs["features"]
    # A token whose squared norm is under the cosine's 1e-8 floor has a cosine under 1 with
    # itself: with one channel, a draw under 1e-4 in size (HIPPO_TEST_SEED=17, about one seed
    # in 700) gave frame 1 a novelty of 0.86. Such tokens are not what this test is about.
    features[features.abs() < 1e-2] = 0.5
    features[1:3] = features[0]
    out = run_op(inputs, num_keep=6, weights=(1, 1, 1))
    temporal = out.temporal_score.cpu()
    assert bool((temporal[1] == 0).all()) and bool((temporal >= 0).all())
    reference, _ = reference_local_scores(features, torch.float64)
    assert bool((reference[1] == 0).all())
    # Frame 1's fused score is its global and spatial parts alone.
    without_temporal = run_op(inputs, num_keep=6, weights=(1, 0, 1))
    torch.testing.assert_close(out.fused_score[1], without_temporal.fused_score[1])


def test_static_scene_moving_patch_is_most_novel(device, gen):
    frames, grid_h, grid_w, channels = 6, 5, 8, 256  # random vectors: |cos| ~ 0.06
    background = torch.randn(1, grid_h, grid_w, channels, generator=gen)
    features = background.repeat(frames, 1, 1, 1)
    features += 0.01 * torch.randn(features.shape, generator=gen)  # sensor noise
    patch = torch.randn(channels, generator=gen)
    positions = [(2, 1 + t) for t in range(frames)]  # moves right by one token per frame
    for t, (y, x) in enumerate(positions):
        features[t, y, x] = patch
    inputs = make_inputs(gen, frames=frames, grid_h=grid_h, grid_w=grid_w, channels=channels,
                         device=device)
    inputs["features"] = features.to(device)
    out = run_op(inputs, num_keep=frames, per_frame=True, weights=(0, 1, 0))
    temporal = out.temporal_score.cpu()
    for t in range(1, frames - 1):  # inside frames the patch differs from both neighbours
        y, x = positions[t]
        frame = temporal[t].clone()
        best = float(frame[y, x])
        frame[y, x] = -1
        assert best > float(frame.max()) + 0.1, f"frame {t}"
        assert t * grid_h * grid_w + y * grid_w + x in out.kept.tolist()


def test_flat_frame_textured_region_is_most_complex(device, gen):
    frames, grid_h, grid_w, channels = 2, 12, 12, 48
    flat = torch.randn(channels, generator=gen)
    features = flat.expand(frames, grid_h, grid_w, channels).clone()
    features += 0.001 * torch.randn(features.shape, generator=gen)
    y0, y1, x0, x1 = 5, 9, 3, 7  # textured region [y0, y1) x [x0, x1)
    features[:, y0:y1, x0:x1] = torch.randn(frames, y1 - y0, x1 - x0, channels, generator=gen)
    inputs = make_inputs(gen, frames=frames, grid_h=grid_h, grid_w=grid_w, channels=channels,
                         device=device)
    inputs["features"] = features.to(device)
    region = (y1 - y0) * (x1 - x0)
    out = run_op(inputs, num_keep=frames * region, per_frame=True, weights=(0, 0, 1))
    spatial = out.spatial_score.cpu()
    # A token's 3x3 neighbourhood touches the region iff it lies in the region grown by one.
    near = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    near[y0 - 1:y1 + 1, x0 - 1:x1 + 1] = True
    for t in range(frames):
        far_max = float(spatial[t][~near].max())
        assert far_max < 1e-3 * float(spatial[t].max())
        # Random textures give random cosines: complex on average, not every single token.
        assert float(spatial[t][y0:y1, x0:x1].mean()) > max(1e-3, 100 * far_max)
    kept = out.kept.cpu()
    kept_y, kept_x = (kept % (grid_h * grid_w)) // grid_w, kept % grid_w
    assert bool(near[kept_y, kept_x].all())


# ---- normalisation, fusion, top-k ----------------------------------------------------------------

@pytest.mark.parametrize("weights", [(1 / 3, 1 / 3, 1 / 3), (0.5, 0.2, 0.3), (1.0, 0.0, 0.0)])
def test_fusion_matches_reference(device, gen, weights):
    inputs = make_inputs(gen, frames=4, grid_h=3, grid_w=4, device=device)
    out = run_op(inputs, num_keep=7, weights=weights)
    # Exactly the reference fusion of the op's own raw scores ...
    fused = reference_fuse(out.global_score, out.temporal_score, out.spatial_score, weights)
    torch.testing.assert_close(out.fused_score, fused, rtol=1e-6, atol=1e-6)
    # ... and close to the float64 reference of the whole op.
    ref = reference_select_visual_tokens(**inputs, num_keep=7, weights=weights,
                                         dtype=torch.float64)
    torch.testing.assert_close(out.fused_score, ref.fused_score.float(), rtol=1e-4, atol=1e-4)
    assert float(out.fused_score.min()) >= 0
    assert float(out.fused_score.max()) <= sum(weights) + 1e-6


def test_normalisation_of_a_constant_frame_is_zero(device, gen):
    inputs = make_inputs(gen, frames=2, grid_h=3, grid_w=3, device=device)
    inputs["features"][1] = inputs["features"][1, 0, 0]  # frame 1: one vector everywhere
    out = run_op(inputs, num_keep=2, weights=(0, 0, 1))
    assert bool((out.fused_score[1] == 0).all())
    assert float(out.fused_score[0].max()) == pytest.approx(1.0)


@pytest.mark.parametrize("per_frame", [False, True])
@pytest.mark.parametrize("frames,grid_h,grid_w,num_keep", [
    (3, 4, 5, 0), (3, 4, 5, 60), (3, 4, 5, 7), (3, 4, 5, 2), (1, 4, 5, 9), (5, 1, 1, 3),
    (1, 1, 1, 1), (1, 1, 1, 0),
])
def test_top_k_matches_reference(device, gen, per_frame, frames, grid_h, grid_w, num_keep):
    inputs = make_inputs(gen, frames=frames, grid_h=grid_h, grid_w=grid_w, extra_visual=2,
                         device=device)
    out = run_op(inputs, num_keep=num_keep, per_frame=per_frame)
    grid_tokens = frames * grid_h * grid_w
    expected = reference_top_k(out.fused_score, num_keep, inputs["num_visual"], per_frame)
    assert out.kept.dtype == torch.int64
    assert out.kept.shape == (num_keep + 2,)
    assert out.kept.tolist() == expected.tolist()
    assert out.kept[-2:].tolist() == [grid_tokens, grid_tokens + 1]  # out-of-grid, always kept
    assert bool((out.kept[1:] > out.kept[:-1]).all())


@pytest.mark.parametrize("per_frame", [False, True])
def test_nan_inputs_show_in_the_scores_and_rank_first(device, gen, per_frame):
    """NaN is not refused (that would sync on CUDA) but never hidden: a NaN feature makes its
    frames' fused scores NaN (not a silent 0 novelty), a NaN query every global score; NaN fused
    scores rank above every number, as torch.topk ranks them, and as the reference does."""
    inputs = make_inputs(gen, frames=3, grid_h=3, grid_w=4, extra_visual=1, device=device)
    inputs["features"][1, 2, 0, 5] = float("nan")
    out = run_op(inputs, num_keep=7, per_frame=per_frame)
    assert bool(out.temporal_score[1, 2, 0].isnan()) and bool(out.spatial_score[1, 2, 0].isnan())
    # The NaN token's temporal pairs reach frames 0 and 2; its spatial ones stay in frame 1.
    assert bool(out.fused_score.isnan().all())
    assert out.kept.tolist() == reference_top_k(out.fused_score, 7, inputs["num_visual"],
                                                per_frame).tolist()
    assert not bool(out.global_score.isnan().any())

    clean = make_inputs(gen, frames=3, grid_h=3, grid_w=4, extra_visual=1, device=device)
    clean["features"][2, 1, 1] = float("nan")  # a NaN vector in the last frame
    # Its temporal pair reaches frame 1 too, but a score whose weight is 0 is left out, not
    # multiplied by 0 (0 * NaN would be NaN): with the spatial score alone, frame 2 only.
    out = run_op(clean, num_keep=7, per_frame=per_frame, weights=(0, 0, 1))
    assert bool(out.temporal_score[1].isnan().any())
    assert out.fused_score.isnan().flatten(1).all(1).tolist() == [False, False, True]
    expected = reference_top_k(out.fused_score, 7, clean["num_visual"], per_frame)
    assert out.kept.tolist() == expected.tolist()
    if not per_frame:  # the 12 NaN tokens of frame 2 come first, lower indices first
        assert out.kept[:7].tolist() == list(range(24, 31))
    # The attention-only ablation's weights: NaN features never reach its selection.
    attention_only = run_op(clean, num_keep=7, per_frame=per_frame, weights=(1, 0, 0))
    assert not bool(attention_only.fused_score.isnan().any())

    clean["queries"][0, 1, 2, 3] = float("nan")
    out = run_op(clean, num_keep=7, per_frame=per_frame)
    assert bool(out.global_score.isnan().all()) and bool(out.fused_score.isnan().all())


def test_nan_key_alone_in_its_key_tile_shows_in_every_global_score(device, gen):
    """A NaN key makes the softmax of every query row that sees it NaN, so every global score is
    NaN, on any device. On CUDA the keys are processed in tiles of 128: here the query row sees
    only key 128 of the second tile (its own position), which is NaN, so that tile's max is -inf
    (fmaxf drops NaN) and its sum NaN; the NaN must not be dropped with the tile. The visual span
    does not contain that key, so no column is NaN by itself."""
    inputs = make_inputs(gen, layers=1, q_heads=2, kv_heads=1, num_queries=1, seq_len=129,
                         frames=2, grid_h=2, grid_w=2, channels=8, visual_start=5, device=device)
    inputs["keys"][0, 0, 128, 3] = float("nan")
    out = run_op(inputs, num_keep=3, scale=0.25)
    assert bool(out.global_score.isnan().all())
    assert bool(out.fused_score.isnan().all())
    # The same with the NaN in a full tile of keys that a row sees nothing else of (the last
    # tile, [128, 256), all NaN) and several query rows.
    inputs = make_inputs(gen, layers=1, q_heads=2, kv_heads=1, num_queries=3, seq_len=200,
                         frames=2, grid_h=2, grid_w=2, channels=8, visual_start=5, device=device)
    inputs["keys"][:, :, 128:] = float("nan")
    out = run_op(inputs, num_keep=3, scale=0.25)
    assert bool(out.global_score.isnan().all())


@pytest.mark.parametrize("weights", [(-1.0, 0.5, 0.0), (-1.0, -1.0, -1.0)])
@pytest.mark.parametrize("per_frame", [False, True])
def test_negative_weights_rank_like_the_reference(device, gen, per_frame, weights):
    """Negative fused scores rank by value too (the order-preserving key of a negative float
    is its bit pattern inverted)."""
    inputs = make_inputs(gen, frames=3, grid_h=3, grid_w=4, extra_visual=1, device=device)
    out = run_op(inputs, num_keep=7, per_frame=per_frame, weights=weights)
    assert bool((out.fused_score < 0).any())
    expected = reference_top_k(out.fused_score, 7, inputs["num_visual"], per_frame)
    assert out.kept.tolist() == expected.tolist()


def test_kept_count_rounds_half_to_even():
    assert [kept_count(32, 0.1), kept_count(16, 0.05), kept_count(7, 0.0), kept_count(5, 1.0)] \
        == [3, 1, 0, 5]
    assert [kept_count(10, 0.25), kept_count(14, 0.25), kept_count(7, 0.5)] == [2, 4, 4]


@pytest.mark.parametrize("per_frame", [False, True])
def test_ties_go_to_the_lower_index(device, gen, per_frame):
    inputs = make_inputs(gen, frames=3, grid_h=2, grid_w=3, extra_visual=1, device=device)
    out = run_op(inputs, num_keep=4, per_frame=per_frame, weights=(0, 0, 0))  # all fused = 0
    # Per frame the quotas are 2, 1, 1 (6 tokens a frame); 18 is the out-of-grid token.
    expected = [0, 1, 6, 12, 18] if per_frame else [0, 1, 2, 3, 18]
    assert out.kept.tolist() == expected


def test_per_frame_quota(device, gen):
    frames, per_frame_tokens = 4, 6
    inputs = make_inputs(gen, frames=frames, grid_h=2, grid_w=3, device=device)
    out = run_op(inputs, num_keep=10, per_frame=True)
    counts = torch.bincount(out.kept.cpu() // per_frame_tokens, minlength=frames)
    assert counts.tolist() == [3, 3, 2, 2]


def test_keep_ratio_and_result_type(device, gen):
    inputs = make_inputs(gen, frames=2, grid_h=5, grid_w=5, device=device)
    out = select_visual_tokens(inputs["queries"], inputs["keys"], inputs["features"],
                               inputs["visual_start"], inputs["num_visual"], keep_ratio=0.1)
    assert isinstance(out, SelectedTokens)
    assert out.kept.numel() == 5
    for score in out[1:]:
        assert score.shape == (2, 5, 5) and score.dtype == torch.float32
    with pytest.raises(ValueError, match="exactly one"):
        select_visual_tokens(inputs["queries"], inputs["keys"], inputs["features"],
                             inputs["visual_start"], inputs["num_visual"])


def test_keep_ratio_must_lie_in_the_unit_interval(device, gen):
    inputs = make_inputs(gen, frames=2, grid_h=2, grid_w=3, extra_visual=1, device=device)
    args = [inputs[k] for k in ("queries", "keys", "features", "visual_start", "num_visual")]
    # The bounds themselves are accepted: keep nothing of the grid, or all of it.
    assert select_visual_tokens(*args, keep_ratio=0.0).kept.tolist() == [12]
    assert select_visual_tokens(*args, keep_ratio=1.0).kept.tolist() == list(range(13))
    for ratio in (1.5, -0.1, float("nan")):  # 1.5 would otherwise keep the whole grid silently
        with pytest.raises(ValueError, match=r"keep_ratio must lie in \[0, 1\]"):
            select_visual_tokens(*args, keep_ratio=ratio)
    with pytest.raises(ValueError, match="exactly one"):
        select_visual_tokens(*args, 3, keep_ratio=0.5)


def test_default_weights_are_equal(device, gen):
    """The docstring's default: equal weights (1/3 each, so a fused score lies in [0, 1])."""
    inputs = make_inputs(gen, frames=3, grid_h=3, grid_w=4, device=device)
    default = select_visual_tokens(inputs["queries"], inputs["keys"], inputs["features"],
                                   inputs["visual_start"], inputs["num_visual"], 9)
    explicit = run_op(inputs, num_keep=9, weights=(1 / 3, 1 / 3, 1 / 3))
    for have, want in zip(default, explicit, strict=True):
        assert torch.equal(have, want)


def test_whole_op_matches_eager_reference(device, gen):
    inputs = make_inputs(gen, layers=2, q_heads=6, kv_heads=2, num_queries=4, frames=3,
                         grid_h=4, grid_w=4, extra_visual=1, device=device)
    out = run_op(inputs, num_keep=12, per_frame=True)
    ref = reference_select_visual_tokens(**inputs, num_keep=12, per_frame=True,
                                         dtype=torch.float64)
    torch.testing.assert_close(out.fused_score, ref.fused_score.float(), rtol=1e-4, atol=1e-4)
    # Compare the kept sets only where no near-tie could flip the selection.
    expected = reference_top_k(out.fused_score, 12, inputs["num_visual"], True)
    assert out.kept.tolist() == expected.tolist()


# ---- opcheck, torch.compile fake, bad inputs --------------------------------------------------------

@pytest.mark.parametrize("per_frame", [False, True])
def test_opcheck(device, gen, per_frame):
    inputs = make_inputs(gen, frames=2, grid_h=3, grid_w=3, extra_visual=1, device=device)
    args = (inputs["queries"], inputs["keys"], inputs["features"], inputs["visual_start"],
            inputs["num_visual"], 5, per_frame, 0.5, 0.25, 0.25, 0.25)
    torch.library.opcheck(OP, args)


def test_fake_shapes(gen):
    inputs = make_inputs(gen, frames=2, grid_h=3, grid_w=4, extra_visual=2)

    def fake_op(num_keep, num_visual=inputs["num_visual"]):
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fake = [mode.from_tensor(inputs[k]) for k in ("queries", "keys", "features")]
            return OP(*fake, inputs["visual_start"], num_visual, num_keep, False, 1.0, 1.0, 1.0, 0.1)

    out = fake_op(5)
    assert out[0].shape == (7,) and out[0].dtype == torch.int64
    assert all(o.shape == (2, 3, 4) and o.dtype == torch.float32 for o in out[1:])
    # num_keep's bounds [0, T*Hg*Wg] are accepted and what lies beyond refused, as by the C++ op
    assert [fake_op(num_keep)[0].shape for num_keep in (0, 24)] == [(2,), (26,)]
    for num_keep in (-1, 25):
        with pytest.raises(RuntimeError, match=r"num_keep must lie in \[0, 24\]"):
            fake_op(num_keep)
    with pytest.raises(RuntimeError, match="num_visual \\(20\\) must cover the T\\*Hg\\*Wg = 24"):
        fake_op(5, num_visual=20)  # as the C++ op refuses it


def _call(inputs, num_keep=3, **changes):
    args = {**inputs, **changes}
    return OP(args["queries"], args["keys"], args["features"], args["visual_start"],
              args["num_visual"], num_keep, False, 1.0, 1.0, 1.0, 0.1)


def test_bad_inputs(device, gen):
    inputs = make_inputs(gen, q_heads=4, kv_heads=2, num_queries=3, device=device)
    q, k, f = inputs["queries"], inputs["keys"], inputs["features"]
    seq_len, grid_tokens = k.shape[2], f.shape[0] * f.shape[1] * f.shape[2]
    with pytest.raises(RuntimeError, match="queries must have 4 dimensions"):
        _call(inputs, queries=q[0])
    with pytest.raises(RuntimeError, match="features must have 4 dimensions"):
        _call(inputs, features=f[0])
    with pytest.raises(RuntimeError, match="keys must have the dtype of queries"):
        _call(inputs, keys=k.half())
    with pytest.raises(RuntimeError, match="queries must be float32, bfloat16 or float16"):
        _call(inputs, queries=q.double(), keys=k.double())
    with pytest.raises(RuntimeError, match="features must be float32"):
        _call(inputs, features=f.to(torch.int32))
    with pytest.raises(RuntimeError, match="multiple of the KV heads"):
        _call(inputs, keys=torch.cat([k, k[:, :1]], dim=1))
    with pytest.raises(RuntimeError, match=r"keys.size\(3\) must be"):
        _call(inputs, keys=k[..., :-1])
    with pytest.raises(RuntimeError, match=r"keys.size\(0\) must be"):
        _call(inputs, keys=k[:1])
    with pytest.raises(RuntimeError, match="contiguous in its last dimension"):
        _call(inputs, keys=k.transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(RuntimeError, match="the last Lq positions"):
        _call(inputs, queries=q.repeat(1, 1, seq_len, 1))
    with pytest.raises(RuntimeError, match="num_keep must lie in"):
        _call(inputs, num_keep=grid_tokens + 1)
    with pytest.raises(RuntimeError, match="num_keep must lie in"):
        _call(inputs, num_keep=-1)
    with pytest.raises(RuntimeError, match="visual span"):
        _call(inputs, visual_start=seq_len - grid_tokens + 1)
    with pytest.raises(RuntimeError, match="visual span"):
        _call(inputs, visual_start=-1)
    with pytest.raises(RuntimeError, match="must cover the T\\*Hg\\*Wg"):
        _call(inputs, num_visual=grid_tokens - 1)
    # Finite as doubles is not enough: the op fuses and scales in float32.
    for weights in [(float("nan"), 1.0, 1.0), (1.0, float("inf"), 1.0), (1e39, 1.0, 1.0),
                    (3e38, 3e38, 0.0)]:
        with pytest.raises(RuntimeError, match="fusion weights and their sum must be finite"):
            run_op(inputs, num_keep=3, weights=weights)
    for scale in (float("nan"), 1e39):
        with pytest.raises(RuntimeError, match="scale must be finite"):
            run_op(inputs, num_keep=3, scale=scale)
    with pytest.raises(RuntimeError, match="visual span"):  # start + count wraps around int64
        torch.ops.hippo_ext.select_visual_tokens(
            inputs["queries"], inputs["keys"], inputs["features"], 2**63 - 1, grid_tokens, 3,
            False, 1.0, 1.0, 1.0, 0.25)
    with pytest.raises(TypeError, match="num_keep must be an integer"):
        run_op(inputs, num_keep=2.7)
    with pytest.raises(TypeError, match="num_keep must be an integer, got the bool True"):
        run_op(inputs, num_keep=True)  # would keep one token
    with pytest.raises(ValueError, match="num_keep must fit in int64"):
        run_op(inputs, num_keep=2**64)
    for weights in ((1.0, 1.0), (1.0, 1.0, 1.0, 1.0)):
        with pytest.raises(ValueError, match=r"weights must be \(w_global, w_temporal, w_spatial\)"):
            run_op(inputs, num_keep=3, weights=weights)
    with pytest.raises(RuntimeError, match="queries must be non-empty"):  # D = 0: no 1/sqrt(0)
        _call(inputs, queries=q[..., :0], keys=k[..., :0])
    # The wrapper's default scale leaves a bad shape to the op too (no ZeroDivisionError, no
    # IndexError on a 0-d tensor).
    with pytest.raises(RuntimeError, match="queries must be non-empty"):
        run_op({**inputs, "queries": q[..., :0], "keys": k[..., :0]}, num_keep=3)
    with pytest.raises(RuntimeError, match="queries must have 4 dimensions"):
        run_op({**inputs, "queries": q[0, 0, 0, 0]}, num_keep=3)
    # int64's bounds: the last values in are passed on (the op then judges them), the first out named.
    for number in (2**63, -(2**63) - 1):
        with pytest.raises(ValueError, match=f"num_keep must fit in int64, got {number}"):
            run_op(inputs, num_keep=number)
    for number in (2**63 - 1, -(2**63)):
        with pytest.raises(RuntimeError, match=rf"num_keep must lie in \[0, {grid_tokens}\], got {number}"):
            run_op(inputs, num_keep=number)


@requires_cuda
@pytest.mark.cuda
def test_mixed_devices_rejected(gen):
    inputs = make_inputs(gen)
    with pytest.raises(RuntimeError, match="is on"):
        _call(inputs, features=inputs["features"].cuda())


# ---- CUDA against CPU -------------------------------------------------------------------------

@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,head_dim", [
    (torch.bfloat16, 128), (torch.float16, 80), (torch.bfloat16, 72), (torch.float32, 64),
    (torch.float16, 20),
])
@pytest.mark.parametrize("per_frame", [False, True])
def test_cuda_matches_cpu(gen, dtype, head_dim, per_frame):
    """Several key tiles, 35 query rows per KV head, a grid that is not a multiple of the tile."""
    inputs = make_inputs(gen, layers=2, q_heads=14, kv_heads=2, num_queries=5, head_dim=head_dim,
                         frames=5, grid_h=7, grid_w=9, channels=136, visual_start=33,
                         extra_visual=1, text_after=301, dtype=dtype)
    num_keep = 31
    cpu = run_op(inputs, num_keep=num_keep, per_frame=per_frame)
    cuda = run_op({k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()},
                  num_keep=num_keep, per_frame=per_frame)
    for name in ("global_score", "temporal_score", "spatial_score", "fused_score"):
        assert rel_error(getattr(cuda, name), getattr(cpu, name)) < 2e-5, name
    # Kept indices agree wherever the CUDA fused scores decide the same selection.
    expected = reference_top_k(cuda.fused_score.cpu(), num_keep, inputs["num_visual"], per_frame)
    assert cuda.kept.cpu().tolist() == expected.tolist()
    # And equal the CPU selection when the k-th and (k+1)-th scores are well separated.
    if not per_frame:
        ranked = cpu.fused_score.flatten().sort(descending=True).values
        if float(ranked[num_keep - 1] - ranked[num_keep]) > 1e-4:
            assert cuda.kept.cpu().tolist() == cpu.kept.tolist()


@requires_cuda
@pytest.mark.cuda
def test_cuda_benchmark_shape_against_float64(gen):
    """The benchmark's attention shape (reduced S), tensor-core path, against float64."""
    inputs = make_inputs(gen, layers=2, q_heads=28, kv_heads=4, num_queries=32, head_dim=128,
                         frames=8, grid_h=14, grid_w=14, channels=256, visual_start=100,
                         text_after=200, dtype=torch.bfloat16, device="cuda")
    scale = 1 / math.sqrt(128)
    out = run_op(inputs, num_keep=157, scale=scale)
    ref = reference_global_score(inputs["queries"], inputs["keys"], inputs["visual_start"],
                                 grid_shape(inputs), scale, dtype=torch.float64)
    assert rel_error(out.global_score, ref) < 1e-4


@requires_cuda
@pytest.mark.cuda
def test_cuda_graph_capture(gen):
    inputs = make_inputs(gen, frames=3, grid_h=4, grid_w=4, dtype=torch.bfloat16, device="cuda",
                         head_dim=64)
    expected = run_op(inputs, num_keep=9, per_frame=True)
    graph, captured = capture_cuda_graph(lambda: run_op(inputs, num_keep=9, per_frame=True))
    graph.replay()
    torch.cuda.synchronize()
    assert captured.kept.tolist() == expected.kept.tolist()
    torch.testing.assert_close(captured.fused_score, expected.fused_score)
