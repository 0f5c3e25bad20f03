"""`--json` on every command prints machine-readable results; a command that explains
something prints the score it explained (the target's logit), held here to a plain
onnxruntime run of the model, never to onnxplain's own output; a command that explains
nothing (inspect, info, methods, export) prints what it shows, checked against the model
file, onnxruntime or the method registry."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import onnxplain
from onnxplain import cli

MODELS = Path(__file__).resolve().parent.parent / "models"
TINY = MODELS / "tiny_cnn.onnx"
PHOTO = MODELS / "chelsea.png"
RELU2 = "/relu2/Relu_output_0"

# Every command of `onnxplain --help`, each specified by a test below.
COMMANDS = {"explain", "explain-dataset", "explain-text", "evaluate", "validate", "report", "prune-study",
            "factorize", "maximize", "export", "inspect", "info", "methods"}


def run(*args):
    r = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def session(model=TINY):
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def logits(x, model=TINY) -> np.ndarray:
    """The reference every explained score is held to: the model by plain onnxruntime."""
    return session(model).run(["logits"], {"input": x})[0]


@pytest.fixture(scope="module")
def photo():
    x, _ = onnxplain.load_image([str(PHOTO)], TINY)
    return x


def test_every_command_takes_json_and_is_specified_here():
    assert set(cli.main.commands) == COMMANDS
    for name, cmd in cli.main.commands.items():
        flags = [p for p in cmd.params if p.name == "as_json"]
        assert flags and flags[0].opts == ["--json"] and flags[0].is_flag, name


# ----------------------------------------------------------------------------- commands that explain


def test_explain_json_gives_the_predicted_class_and_its_logit(photo, tmp_path):
    (record,) = run("explain", TINY, PHOTO, "-o", tmp_path / "a.npy", "--json")
    want = logits(photo)[0]
    assert record["target"] == record["predicted"] == int(want.argmax())
    assert record["score"] == pytest.approx(float(want.max()), rel=1e-5, abs=1e-6)


def test_explain_json_gives_the_logit_of_the_class_asked_for(photo, tmp_path):
    (record,) = run("explain", TINY, PHOTO, "-t", "7", "-o", tmp_path / "a.npy", "--json")
    assert record["target"] == 7
    assert record["score"] == pytest.approx(float(logits(photo)[0, 7]), rel=1e-5, abs=1e-6)


def test_evaluate_json_gives_each_samples_explained_logit(photo, tmp_path):
    printed = run("evaluate", TINY, PHOTO, "--methods", "gradient", "--metrics", "deletion", "-S", "deletion:steps=3",
                  "-t", "2", "-o", tmp_path / "e.json", "-q", "--json")
    (s,) = printed["samples"]
    assert s["target"] == 2 and s["score"] == pytest.approx(float(logits(photo)[0, 2]), rel=1e-5, abs=1e-6)
    assert isinstance(printed["table"]["gradient"]["deletion"], float)


def test_validate_json_gives_the_reference_and_candidate_logits(photo, tmp_path):
    printed = run("validate", TINY, TINY, PHOTO, "-m", "gradient", "--report", tmp_path / "v.json", "-q", "--json")
    (s,) = printed["samples"]
    want = logits(photo)[0]
    assert s["target"] == int(want.argmax())
    for key in ("reference_score", "candidate_score"):
        assert s[key] == pytest.approx(float(want.max()), rel=1e-5, abs=1e-6)


def test_report_json_gives_each_samples_explained_logit(photo, tmp_path):
    printed = run("report", TINY, PHOTO, "--methods", "gradient", "--metrics", "none", "-t", "4",
                  "-o", tmp_path / "r.html", "-q", "--json")
    (s,) = printed["samples"]
    assert s["target"] == 4 and s["score"] == pytest.approx(float(logits(photo)[0, 4]), rel=1e-5, abs=1e-6)
    assert printed["file"] == str(tmp_path / "r.html") and (tmp_path / "r.html").is_file()


@pytest.fixture()
def folder(tmp_path):
    """Two photos the model reads and one file it cannot."""
    d = tmp_path / "photos"
    d.mkdir()
    img = Image.open(PHOTO)
    img.save(d / "a.png")
    img.transpose(Image.FLIP_LEFT_RIGHT).save(d / "c.png")
    (d / "b.png").write_bytes(b"not a picture")
    x, _ = onnxplain.load_image([str(d / "a.png"), str(d / "c.png")], TINY)
    return d, x


def test_explain_dataset_json_gives_counts_paths_and_every_index_record_with_its_logit(folder, tmp_path):
    d, x = folder
    out = tmp_path / "out"
    printed = run("explain-dataset", TINY, d, "--out", out, "-t", "5", "--json")
    assert (printed["explained"], printed["reused"], printed["failed"]) == (2, 0, 1)
    assert printed["total"] == 3
    assert Path(printed["index"]) == out / "index.jsonl"
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert printed["records"] == index
    assert [r["id"] for r in printed["records"]] == ["a.png", "b.png", "c.png"]
    ok = [r for r in printed["records"] if "error" not in r]
    assert [r["target"] for r in ok] == [5, 5]
    np.testing.assert_allclose([r["score"] for r in ok], logits(x)[:, 5], rtol=1e-5, atol=1e-6)
    assert "b.png" in printed["records"][1]["error"]
    assert printed["shards"] == sorted({str(out / r["shard"]) for r in ok})
    for shard, r in zip([str(out / r["shard"]) for r in ok], ok):
        with np.load(shard) as z:
            assert z["attribution"].shape[1:] == (3, 32, 32) and r["row"] < len(z["attribution"])


def test_explain_dataset_json_counts_what_a_resumed_run_kept(folder, tmp_path):
    d, x = folder
    out = tmp_path / "out"
    run("explain-dataset", TINY, d, "--out", out, "-q", "--json")
    printed = run("explain-dataset", TINY, d, "--out", out, "--resume", "-q", "--json")
    # Everything is kept, the error too: the same input under the same key fails the same way.
    assert (printed["explained"], printed["reused"], printed["failed"]) == (0, 3, 0)
    assert "error" in printed["records"][1]
    ok = [r for r in printed["records"] if "error" not in r]
    want = logits(x)
    assert [r["target"] for r in ok] == [int(c) for c in want.argmax(axis=1)]
    np.testing.assert_allclose([r["score"] for r in ok], want.max(axis=1), rtol=1e-5, atol=1e-6)


def masked(model_path, layer, channels, path):
    """The model with `channels` of `layer` multiplied by zero: pruning written out here,
    independently of onnxplain's own pruning."""
    m = onnx.load(str(model_path))
    nodes = list(m.graph.node)
    for node in nodes:
        node.input[:] = [layer + ".kept" if i == layer else i for i in node.input]
    at = next(i for i, n in enumerate(nodes) if layer in n.output) + 1
    nodes.insert(at, helper.make_node("Mul", [layer, "channel_mask"], [layer + ".kept"]))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    mask = np.ones((1, 16, 1, 1), np.float32)
    mask[0, channels] = 0.0
    m.graph.initializer.append(numpy_helper.from_array(mask, "channel_mask"))
    onnx.save(m, str(path))
    return path


def test_prune_study_json_gives_the_logit_of_the_unpruned_and_of_every_pruned_model(photo, tmp_path):
    printed = run("prune-study", TINY, PHOTO, "--layer", RELU2, "--box", "0,0,16,16", "-t", "3", "--k", "1,3",
                  "--n-steps", "4", "--json")
    (s,) = printed["samples"]
    assert s["id"] == "chelsea.png" and s["input"] == str(PHOTO) and s["target"] == 3
    assert s["predicted"] == int(logits(photo)[0].argmax())
    assert s["score"] == pytest.approx(float(logits(photo)[0, 3]), rel=1e-5, abs=1e-6)
    assert len(printed["rows"]) == 1 + 2 * 2
    for row in printed["rows"]:
        model = TINY if not row["pruned"] else masked(TINY, RELU2, row["pruned"], tmp_path / "m.onnx")
        (score,) = row["scores"]
        assert score == pytest.approx(float(logits(photo, model)[0, 3]), rel=1e-5, abs=1e-6), row
    assert printed["unpruned"]["scores"] == printed["rows"][0]["scores"]
    assert any(row["scores"] != printed["rows"][0]["scores"] for row in printed["rows"][1:])  # pruning shows


def test_factorize_json_gives_each_factorized_class_with_its_logit(photo, tmp_path):
    printed = run("factorize", TINY, PHOTO, "--classes", "top3", "-o", tmp_path / "f.png", "-q", "--json")
    want = logits(photo)[0]
    top = [int(c) for c in np.argsort(-want, kind="stable")[:3]]
    assert [c["class"] for c in printed["explained"]] == top
    np.testing.assert_allclose([c["score"] for c in printed["explained"]], want[top], rtol=1e-5, atol=1e-6)
    assert printed["input"] == str(PHOTO) and printed["classes"] == 3


def test_maximize_json_gives_the_logit_of_the_input_it_wrote(tmp_path):
    out = tmp_path / "m.npy"
    printed = run("maximize", TINY, "-t", "6", "-O", "n_iter=3", "-o", out, "-q", "--json")
    x = np.load(out)
    assert printed["file"] == str(out) and printed["steps"] == len(printed["scores"]) == 3
    assert printed["final"] == pytest.approx(float(logits(x)[0, 6]), rel=1e-5, abs=1e-6)


VOCAB = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "the", "movie", "was", "wonderful", "!"]


@pytest.fixture(scope="module")
def token_model(tmp_path_factory):
    """A word-embedding classifier (masked mean of embeddings -> 3 logits) and its tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, normalizers, pre_tokenizers, processors

    d = tmp_path_factory.mktemp("tokens")
    tok = tokenizers.Tokenizer(models.WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = [("[CLS]", 1), ("[SEP]", 2)]
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=specials)
    tok.save(str(d / "tokenizer.json"))
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "last"], ["m3"]),
             helper.make_node("Mul", ["h", "m3"], ["hm"]),
             helper.make_node("ReduceSum", ["hm", "tokens"], ["s"], keepdims=0),
             helper.make_node("ReduceSum", ["m3", "tokens"], ["n"], keepdims=0),
             helper.make_node("Div", ["s", "n"], ["mean"]),
             helper.make_node("MatMul", ["mean", "W"], ["logits"])]
    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
            for n in ("input_ids", "attention_mask")]
    out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])]
    weights = {"E": rng.normal(size=(len(VOCAB), 6)).astype(np.float32),
               "W": rng.normal(size=(6, 3)).astype(np.float32),
               "last": np.array([2], np.int64), "tokens": np.array([1], np.int64)}
    graph = helper.make_graph(nodes, "tokens", ints, out,
                              initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(d / "tokens.onnx"))
    return d / "tokens.onnx", d / "tokenizer.json", tok


def test_explain_text_json_gives_the_logit_of_the_sentence(token_model):
    path, tokenizer, tok = token_model
    printed = run("explain-text", path, "--tokenizer", tokenizer, "--text", "The movie was wonderful!", "-t", "1",
                  "-m", "gradient", "--json")
    enc = tok.encode("The movie was wonderful!")
    ids = np.array([enc.ids], np.int64)
    (want,) = session(path).run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert [t["token"] for t in printed["tokens"]] == enc.tokens
    assert printed["target"] == "1"  # the target as spelt (text targets are sentences)
    assert printed["explained_score"] == pytest.approx(float(want[0, 1]), rel=1e-5, abs=1e-6)
    assert printed["score"] == printed["explained_score"]  # the key the other commands use


# ----------------------------------------------------------------------------- commands that show


def test_export_json_names_what_the_written_explainer_takes_and_gives(photo, tmp_path):
    out = tmp_path / "ex.onnx"
    printed = run("export", TINY, "-m", "gradient", "-o", out, "--json")
    written = onnx.load(str(out))
    assert [f["name"] for f in printed["feeds"]] == [v.name for v in written.graph.input]
    assert [r["name"] for r in printed["reads"]] == [v.name for v in written.graph.output]
    assert printed["attributions"] == {"input": printed["reads"][-1]["name"]}
    seed = np.eye(10, dtype=np.float32)[[3]]
    model_out, attribution = session(out).run([r["name"] for r in printed["reads"]],
                                              {"input": photo, printed["feeds"][1]["name"]: seed})
    np.testing.assert_allclose(model_out, logits(photo), rtol=1e-5, atol=1e-6)
    assert attribution.shape == photo.shape


def test_inspect_json_lists_the_model_files_inputs_outputs_and_tensors():
    printed = run("inspect", TINY, "--json")
    m = onnx.load(str(TINY))
    assert [i["name"] for i in printed["inputs"]] == [v.name for v in m.graph.input]
    assert [o["name"] for o in printed["outputs"]] == [v.name for v in m.graph.output]
    assert printed["inputs"][0]["shape"][1:] == [3, 32, 32] and printed["outputs"][0]["shape"][1:] == [10]
    assert printed["opset"] == m.opset_import[0].version
    produced = {o for n in m.graph.node for o in n.output}
    assert printed["layers"] and {layer["tensor"] for layer in printed["layers"]} <= produced
    assert RELU2 in {layer["tensor"] for layer in printed["layers"]}


def test_info_json_gives_the_versions_and_providers_of_this_onnxruntime():
    printed = run("info", "--json")
    assert printed["onnxruntime"] == ort.__version__ and printed["onnx"] == onnx.__version__
    assert printed["installed_providers"] == ort.get_available_providers()
    assert "CPUExecutionProvider" in printed["working_providers"]


def test_methods_json_lists_every_registered_method_with_its_options():
    from onnxplain.methods.base import METHODS

    printed = run("methods", "--json")
    assert [m["name"] for m in printed] == list(METHODS)
    ig = next(m for m in printed if m["name"] == "integrated_gradients")
    assert "n_steps" in [o["name"] for o in ig["options"]]
