"""Tab. 2 and Fig. 11 on the decoder's attention (issue 40): a latent token's map is its attention column
from the 2D queries at a decoder layer, segments are scored per true segment (best token and Hungarian),
thresholded by a percentile of the cells or by attention mass, and the claims are judged on one scale."""
import pytest
import torch

from data import ShapesDataset
from model import ALIT, make_config
from observe import QueryColumns, decoder_attention, map_layer
from segments import (MATCHINGS, THRESHOLDINGS, best_token_scores, hungarian_scores, segment_claims, segment_ious,
                      segment_scores, top_mass_segment, top_percentile_segment)
from verdicts import VERDICTS
from vqgan import PRESETS as VQGAN_PRESETS
from vqgan import VQGANConfig

G = 4  # a 4 x 4 grid of 2D tokens
N = G * G
BLOCK = [0, 1, 4, 5]  # the top-left 2 x 2 cells


def constructed_attention(latents: int = 3, attended: int = 1, heads: int = 2) -> torch.Tensor:
    """(1, heads, L, L) attention over the decoder's [class; N mask tokens; latents] in which the 2D queries
    of BLOCK, and no others, attend latent token `attended`: every row spreads evenly over the other columns."""
    L = 1 + N + latents
    column = 1 + N + attended
    weights = torch.ones(1, heads, L, L)
    weights[..., column] = 0
    weights[:, :, [1 + i for i in BLOCK], column] = L  # the block's queries put most of their weight there
    return weights / weights.sum(-1, keepdim=True)


def block_truth() -> torch.Tensor:
    """(1, N) labels: the block is object 2 on background halves 0 and 1."""
    truth = torch.tensor([0, 0, 1, 1] * G)
    truth[BLOCK] = 2
    return truth[None]


def tiny_model(**overrides):
    torch.manual_seed(0)
    vqgan = VQGANConfig(**{**VQGAN_PRESETS["tiny"], "channels": 16, "norm_groups": 8})
    return ALIT(make_config("tiny", encoder_width=64, encoder_heads=2, decoder_width=64, decoder_heads=2,
                            vqgan=vqgan, **overrides)).eval()


def test_a_latent_tokens_map_is_its_attention_column_from_the_2d_queries():
    columns = QueryColumns(N)
    columns.append(constructed_attention())
    (kept,) = columns
    assert kept.shape == (1, 2, N, 3)  # (B, heads, 2D queries, latent tokens)
    maps = kept.mean(1).transpose(1, 2)  # (B, latents, N), heads averaged
    assert set(maps[0, 1].nonzero().view(-1).tolist()) == set(BLOCK)
    for thresholding in (top_percentile_segment, top_mass_segment):
        share = len(BLOCK) / N if thresholding is top_percentile_segment else 0.5
        segment = thresholding(maps[0, 1], share)
        assert segment.nonzero().view(-1).tolist() == BLOCK
    scores = segment_scores(maps, block_truth(), [len(BLOCK) / N])  # (B, thresholdings, matchings, shares)
    assert scores.shape == (1, len(THRESHOLDINGS), len(MATCHINGS), 1)
    assert torch.equal(scores, torch.ones_like(scores))  # IoU 1 with the true segment, by both matchings
    # The official notebook's column 256 + idx (here N + idx) is the column before latent token idx's:
    # for idx = 1 it reads latent token 0's, which the block attends least, and misses the block.
    full = constructed_attention()[0].mean(0)
    assert torch.equal(full[1:1 + N, 1 + N + 1], maps[0, 1])
    notebook = full[1:1 + N, N + 1]
    assert segment_scores(notebook[None, None], block_truth(), [len(BLOCK) / N]).max() == 0


def test_decoder_attention_records_the_query_columns_of_every_decoded_iteration():
    model = tiny_model(decoder_layers=2)
    cfg = model.config
    T, K = cfg.rollout_iters, cfg.tokens_per_iter
    data = ShapesDataset("val", cfg.image_size, 2)
    x = torch.stack([data[i][0] for i in range(2)])
    with torch.no_grad(), decoder_attention(model, 1) as columns:
        model(x)
    assert model.decoder[1].attn.record is None  # the fused path again after the block
    model.decoder[1].attn.record = []
    with torch.no_grad():
        model(x)
    full, model.decoder[1].attn.record = model.decoder[1].attn.record, None
    assert len(columns) == T  # one decoder pass per decoded iteration
    for t, (kept, weights) in enumerate(zip(columns, full)):
        grid = cfg.num_image_tokens
        assert kept.shape == (2, cfg.decoder_heads, grid, (t + 1) * K)
        torch.testing.assert_close(kept, weights[:, :, 1:1 + grid, 1 + grid:])


def test_the_map_layer_is_the_papers_7th_of_8_and_the_last_of_one():
    assert map_layer(None, make_config("small")) == 6  # 0-based: the 7th of Ours-S's 8
    assert map_layer(None, make_config("tiny")) == 0  # one decoder layer: its last
    assert map_layer(3, make_config("small")) == 2
    with pytest.raises(ValueError, match="layers 1 to 1"):
        map_layer(2, make_config("tiny"))


def test_a_percentile_threshold_keeps_x_of_the_cells():
    maps = torch.rand(5, 3, 100, generator=torch.Generator().manual_seed(0))
    for share in (0.1, 0.4, 0.6, 0.8, 1.0):
        segment = top_percentile_segment(maps, share)
        assert (segment.sum(-1) == round(share * 100)).all()
        # the cells kept are the highest ones
        assert (maps.masked_fill(~segment, 2).min(-1).values >= maps.masked_fill(segment, -1).max(-1).values).all()
    assert (top_percentile_segment(torch.rand(2, 64), 0.4).sum(-1) == 26).all()  # 25.6 cells rounded
    assert (top_percentile_segment(torch.rand(2, 64), 0.001).sum(-1) == 1).all()  # at least one cell


def test_segment_scores_are_averaged_over_the_true_segments():
    # objects 2, 3, 4: token 0 is object 2 exactly, token 1 half of object 3 and nothing else; object 4 is
    # covered by no token and scores 0. Averaged over the tokens (the old protocol) this would read (1 + 1/2) / 2.
    truth = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4]])
    segments = torch.zeros(1, 2, 12, dtype=torch.bool)
    segments[0, 0, [4, 5]] = True
    segments[0, 1, [6, 7]] = True
    iou, present = segment_ious(segments, truth)
    assert iou.shape == (1, 3, 2) and present.tolist() == [[True, True, True]]
    torch.testing.assert_close(iou[0], torch.tensor([[1, 0], [0, 0.5], [0, 0]]))
    assert best_token_scores(iou, present).item() == pytest.approx((1 + 0.5 + 0) / 3)
    assert hungarian_scores(iou, present).item() == pytest.approx((1 + 0.5 + 0) / 3)
    # an object label absent from the image is no segment: labels 2 and 4 only
    truth = torch.tensor([[0, 0, 1, 1, 2, 2, 0, 0, 0, 0, 4, 4]])
    iou, present = segment_ious(segments, truth)
    assert present.tolist() == [[True, False, True]] and best_token_scores(iou, present).item() == pytest.approx(0.5)
    # an image without objects has no score
    assert best_token_scores(*segment_ious(segments, torch.zeros(1, 12, dtype=torch.long))).isnan().all()


def test_hungarian_and_best_token_differ_when_one_token_is_best_for_two_segments():
    # object 2: cells 0-3, object 3: cells 4-5. Token 0 spans both (IoU 4/6 and 2/6), token 1 cells 5-9 (0 and 1/6):
    # token 0 is the best of both objects (4/6 + 2/6) / 2; one to one, object 3 gets token 1: (4/6 + 1/6) / 2.
    truth = torch.tensor([[2, 2, 2, 2, 3, 3, 0, 0, 0, 0]])
    segments = torch.zeros(1, 2, 10, dtype=torch.bool)
    segments[0, 0, :6] = True
    segments[0, 1, 5:] = True
    iou, present = segment_ious(segments, truth)
    assert best_token_scores(iou, present).item() == pytest.approx(0.5)
    assert hungarian_scores(iou, present).item() == pytest.approx(5 / 12)
    # more objects than tokens: the object left without a token scores 0
    one = segments[:, :1]
    iou, present = segment_ious(one, truth)
    assert hungarian_scores(iou, present).item() == pytest.approx((4 / 6 + 0) / 2)
    # batched over images and shares, as segment_scores calls it, each matrix solved on its own
    both_orders = torch.stack([segments, segments.flip(1)], 1).expand(3, -1, -1, -1)  # (images, shares, tokens, N)
    iou, present = segment_ious(both_orders, truth.expand(3, -1))
    torch.testing.assert_close(hungarian_scores(iou, present), torch.full((3, 2), 5 / 12))


def test_claims_are_not_testable_where_shuffled_maps_score_as_high():
    n, T, shares = 40, 3, [0.4, 0.6]
    rng = torch.Generator().manual_seed(0)
    trained = torch.rand(n, T, len(THRESHOLDINGS), len(MATCHINGS), len(shares), generator=rng)
    readings = {"decoder, heads averaged, tokens 1-8": trained,
                "shuffled decoder maps, tokens 1-8": trained.clone(),
                "encoder, last layer, tokens 1-8": trained - 0.2,
                "untrained ALIT's decoder, tokens 1-8": trained[:, -1:] + 0.2}
    claims = segment_claims(readings, "decoder, heads averaged, tokens 1-8", shares, 0.4)
    rise = claims["rise at 40%, iteration 1 to the last"]
    assert {d["verdict"] for d in rise.values()} == {"not testable at this size"}
    assert all("shuffled maps score as high" in d["why"] and d["paper"] == pytest.approx(0.011) for d in rise.values())
    assert {d["verdict"] for d in claims["last iteration, best X per image, over the encoder's maps"].values()} == {
        "holds"}
    assert {d["verdict"] for d in claims["last iteration, best X per image, over the untrained ALIT"].values()} == {
        "opposite"}
    assert all(d["verdict"] in VERDICTS for claim in claims.values() for d in claim.values())
