"""Review of 1620f4c (built-in prices for GPT-5.1/5.2, grok-3-fast, gpt-4o-mini-tts; `fast` as a
sibling word), measured through the real sidecar in front of loopback upstreams speaking the
providers' wire formats. Every process started here is stopped here.

Checked and found right (no test here): gpt-5.1/-chat-latest/-codex/-codex-max, gpt-5.2/-codex/
-chat-latest/-pro and their snapshots, gpt-5.1-codex-mini, grok-3-fast(-beta), grok-3-mini-fast
(-beta), gpt-4o-mini-tts speech SSE on /openai, Azure and a universal step (usage counted once
even when deltas carry one), Responses cached input of 5.1/5.2 (stream and not), a spec.pricing
override of gpt-5.1 keeping the 0.1x cache rule, cf-aig-custom-cost on gpt-5.2."""

import json

import pytest

from test_accounting_edges import post, served  # noqa: F401  (`served` is a fixture)


def responses_answer(model, inp, cached, out):
    return json.dumps({
        "id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": model,
        "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": "hi", "annotations": []}]}],
        "usage": {"input_tokens": inp, "input_tokens_details": {"cached_tokens": cached},
                  "output_tokens": out, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": inp + out},
    }).encode()


# The commit gives the 0.1x cached-input rule to the point releases it prices (5.1, 5.2) by name,
# not to the GPT-5 family's later ones: README sends those to spec.pricing ("spec.pricing is how
# those get a price", test_tool_fees_review.py) and says cached input is "0.1x for GPT-5 models
# (5.1 and 5.2 too)", yet an entry for gpt-5.3-codex or gpt-5.4 prices cached input at the full
# input price (10x). Figures: gpt-5.3-codex $1.75 / cached $0.175 / $14 (GitHub Docs' Copilot
# models-and-pricing table, the source the commit cites for 5.2); gpt-5.4 $2.50 / $0.25 / $15
# (ShellPilot PriceTable.psd1, evolink.ai GPT-5.2 vs 5.4 guide, Bifrost model library).
# Failed at 05b9ae5 (mended since): a spec-priced later GPT-5 point release (gpt-5.3-codex, gpt-5.4) prices cached input at 1x, not 0.1x
@pytest.mark.parametrize("model, inp, out", [("gpt-5.3-codex", "1.75", "14"), ("gpt-5.4", "2.50", "15")])
def test_a_spec_priced_later_gpt_5_point_release_prices_cached_input_at_a_tenth(served, model, inp, out):
    spec = f"  pricing:\n    - {{model: {model}, inputPerMillion: '{inp}', outputPerMillion: '{out}'}}\n"
    g, _ = served([responses_answer(model, 10_000, 4_000, 500)], extra_spec=spec,
                  content_type="application/json")
    r, line = post(g, "/openai/responses", {"model": model, "input": "hi"})
    assert r.status_code == 200, r.text
    assert (line["tokens_in"], line["tokens_out"]) == (10_000, 500), line
    i, o = float(inp), float(out)
    want = (6_000 * i + 4_000 * i * 0.1 + 500 * o) / 1e6
    assert line["cost"] == pytest.approx(want, rel=1e-9), (model, line["cost"], want)


def messages_answer(model, inp, out):
    return json.dumps({
        "id": "msg_1", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": inp, "output_tokens": out, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0},
    }).encode()


# Outside the commit but the same class of fault it mends for gpt-5.1 (a newer model priced by
# an older table name it continues), and worse (a wrong price, not none): claude-opus-4-6,
# -4-7 and -4-8 continue `claude-opus-4` after `-` and are logged and charged at Opus 4's
# $15 / $75, three times their list price. Source: platform.claude.com/docs/en/models/
# opus-4-6/overview ("Input pricing: $5 / MTok · Output pricing: $25 / MTok"); Opus 4.7 and 4.8
# $5 / $25 (docs.venice.ai claude-opus-4-6 page, related models). The anthropic SDK installed
# here lists all three. Fixed either by rows of their own or by no price, not Opus 4's.
# Failed at 05b9ae5 (mended since): claude-opus-4-6/4-7/4-8 are priced as claude-opus-4 ($15/$75), 3x their $5/$25 list price
@pytest.mark.parametrize("model", ["claude-opus-4-6", "claude-opus-4-7", "claude-opus-4-8"])
def test_later_claude_opus_4_x_models_are_not_charged_at_opus_4s_price(served, model):
    g, _ = served([messages_answer(model, 1_000, 100)], content_type="application/json")
    r, line = post(g, "/anthropic/v1/messages",
                   {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    assert (line["tokens_in"], line["tokens_out"]) == (1_000, 100), line
    listed = (1_000 * 5.0 + 100 * 25.0) / 1e6
    assert line["cost"] is None or line["cost"] == pytest.approx(listed, rel=1e-9), (
        model, line["cost"], "Opus 4's price would be", (1_000 * 15.0 + 100 * 75.0) / 1e6)
