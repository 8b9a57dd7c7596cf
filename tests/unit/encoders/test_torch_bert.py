"""encoders/torch_bert.py, the code the torch runtime serves: equal to transformers' BERT, strict about its
weights file, and its CUDA-graph buckets (the bucket arithmetic; the graphs themselves need a GPU)."""
import pytest
import torch

from bert_recsys.encoders import torch_bert as tb


def tiny_transformers_bert(pooling="mean"):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    hf = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=40, attn_implementation="eager")
    model = BertModel(hf, add_pooling_layer=False).eval()
    ours = tb.BertConfig(hidden=32, heads=4, layers=2, intermediate=64, vocab=120, max_positions=40,
                         layer_norm_eps=hf.layer_norm_eps, activation=hf.hidden_act, pooling=pooling)
    return model, ours


def reference(model, ids, mask, pooling):
    with torch.inference_mode():
        hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        m = mask.unsqueeze(-1).float()
        pooled = (hidden * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_it_computes_what_transformers_bert_computes_after_a_save_and_load(tmp_path, pooling):
    model, config = tiny_transformers_bert(pooling)
    tb.save(tmp_path / "w.safetensors", config, tb.from_transformers_state(model.state_dict(), config), torch.float32)
    ours = tb.load(tmp_path / "w.safetensors")
    ids = torch.randint(1, 120, (5, 17))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[3, 2:] = 0  # a very short row among long ones
    with torch.inference_mode():
        got = ours(ids, mask)
    expected = reference(model, ids, mask, pooling)
    assert torch.nn.functional.cosine_similarity(got, expected).min().item() >= 0.99999
    # Padding tokens change nothing: the short row alone equals the short row in the batch.
    with torch.inference_mode():
        alone = ours(ids[3:4, :2], mask[3:4, :2])
    assert torch.nn.functional.cosine_similarity(alone, got[3:4]).item() >= 0.99999


def test_fp16_weights_load_in_fp16_or_upcast(tmp_path):
    model, config = tiny_transformers_bert()
    tb.save(tmp_path / "w.safetensors", config, tb.from_transformers_state(model.state_dict(), config), torch.float16)
    assert next(iter(tb.load(tmp_path / "w.safetensors").buffers())).dtype == torch.float16
    upcast = tb.load(tmp_path / "w.safetensors", dtype=torch.float32)
    assert all(b.dtype == torch.float32 for b in upcast.buffers())
    ids = torch.randint(1, 120, (2, 9))
    with torch.inference_mode():
        got = upcast(ids, torch.ones_like(ids))
    assert torch.nn.functional.cosine_similarity(got, reference(model, ids, torch.ones_like(ids), "mean")).min() > 0.999


def test_a_weights_file_of_another_format_or_shape_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    model, config = tiny_transformers_bert()
    weights = tb.from_transformers_state(model.state_dict(), config)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(tb.WeightsError, match="format 'pt'"):
        tb.load(tmp_path / "other.safetensors")
    del weights["layers.1.qkv.bias"]
    save_file(weights, str(tmp_path / "missing.safetensors"), metadata=config.to_metadata())
    with pytest.raises(tb.WeightsError, match="lack 1 tensors"):
        tb.load(tmp_path / "missing.safetensors")
    weights["layers.1.qkv.bias"] = torch.zeros(5)
    save_file(weights, str(tmp_path / "shape.safetensors"), metadata=config.to_metadata())
    with pytest.raises(tb.WeightsError, match=r"layers.1.qkv.bias has shape \(5,\)"):
        tb.load(tmp_path / "shape.safetensors")
    with pytest.raises(tb.WeightsError, match="lacks"):
        tb.from_transformers_state({}, config)
    with pytest.raises(tb.WeightsError, match="multiple of"):
        tb.BertConfig(hidden=30, heads=4, layers=1, intermediate=8, vocab=10, max_positions=8)


@pytest.mark.parametrize("max_batch, expected", [(1, [1]), (10, [1, 2, 4, 8, 10]),
                                                 (64, [1, 2, 4, 8, 16, 32, 48, 64]),
                                                 (100, [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100])])
def test_batch_buckets_pad_small_batches_under_2x_and_large_ones_under_16_rows(max_batch, expected):
    buckets = tb.batch_buckets(max_batch)
    assert buckets == expected
    for rows in range(1, max_batch + 1):
        size = tb.bucket_of(rows, buckets)
        assert rows <= size < max(2 * rows, rows + 16)


def test_sequence_buckets_cover_every_length_up_to_the_models_maximum():
    assert tb.sequence_buckets(128) == [16, 32, 48, 64, 80, 96, 112, 128]
    assert tb.sequence_buckets(100)[-1] == 100 and tb.bucket_of(97, tb.sequence_buckets(100)) == 100
    with pytest.raises(ValueError, match="exceeds the largest bucket 128"):
        tb.bucket_of(129, tb.sequence_buckets(128))


def test_it_imports_nothing_but_torch_safetensors_and_the_standard_library():
    """It is copied alone into the model repository and run by Triton's stub."""
    import ast
    import sys

    tree = ast.parse(open(tb.__file__).read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names - set(sys.stdlib_module_names) - {"__future__"} == {"torch", "safetensors"}
