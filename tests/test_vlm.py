"""Qwen2-VL / Qwen2.5-VL against transformers (+ PEFT): vision features, logits, greedy generation,
image preprocessing, LoRA gradients, adapters and merged export, the collator, a short fine-tune."""

import dataclasses
import importlib
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import jft
import jft.vlm as vlm
from jft.data.testing import make_tiny_tokenizer
from jft.lora import LoRA
from jft.vlm import train as vtrain
from jft.vlm.collator import IMAGE_PAD, QWEN_VL_CHAT_TEMPLATE, VISION_END, VISION_START, VisionCollator
from jft.vlm.export import save_lora, save_merged

KINDS = ("qwen2_vl", "qwen2_5_vl")
PATCH, MERGE = 4, 2
PIXELS = dict(min_pixels=8 * 8, max_pixels=40 * 40)  # tiny images: at most 100 patches


def _tokenizer(path):
    tok = make_tiny_tokenizer(vocab_size=400, chat_template=None)
    tok.add_tokens([VISION_START, VISION_END, IMAGE_PAD, "<|video_pad|>"], special_tokens=True)
    tok.chat_template = QWEN_VL_CHAT_TEMPLATE
    tok.eos_token = "<|im_end|>"
    tok.save_pretrained(path)
    return tok


def _hf_config(kind, tok):
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (("image_token_id", IMAGE_PAD), ("video_token_id", "<|video_pad|>"),
           ("vision_start_token_id", VISION_START), ("vision_end_token_id", VISION_END))}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=PATCH,
                      spatial_merge_size=MERGE, temporal_patch_size=2)
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def _make_hf(kind, tok, seed=0):
    cls = transformers.Qwen2VLForConditionalGeneration if kind == "qwen2_vl" else transformers.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(_hf_config(kind, tok)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = ("norm" in name or "ln_q" in name) and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.1 + 1.0 if is_scale else torch.randn_like(p) * 0.08)
    return model


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    tok = _tokenizer(path)
    hf = _make_hf(request.param, tok)
    hf.save_pretrained(path)
    with open(path / "preprocessor_config.json", "w") as f:
        json.dump({"patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": 2, **PIXELS}, f)
    return request.param, hf, vlm.load(str(path), dtype="float32", progress=False)


def _image(h, w, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


def _prompt_ids(model, grids, texts=((5, 6), (7, 8, 9), (10, 11))):
    c = model.config
    ids = list(texts[0])
    for g, text in zip(grids, texts[1:]):
        ids += [c.vision_start_token_id] + [c.image_token_id] * int(np.prod(g) // MERGE**2) + [c.vision_end_token_id]
        ids += list(text)
    return ids


def _hf_logits(hf, model, ids, pixels, grids, mask=None):
    ids = np.asarray(ids)
    kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids),
                 mm_token_type_ids=torch.tensor((ids == model.config.image_token_id).astype(np.int64)), **kw)
    return out.logits.numpy()


# --- parity ----------------------------------------------------------------------------------


def test_window_order_makes_each_window_and_frame_one_run_of_whole_merge_blocks():
    """The flash kernel visits a query block's key blocks from the first to the last holding its segment,
    so Qwen2.5's windows must be contiguous to be cheap; the merger needs merge blocks whole."""
    from jft.nn.vision import patch_metadata, window_order
    from jft.vlm.config import VisionConfig

    vc = VisionConfig(kind="qwen2_5_vl", depth=1, hidden_size=8, intermediate_size=8, num_heads=1, out_hidden_size=8,
                      patch_size=4, window_size=16)  # windows of 2 x 2 merged tokens
    meta = patch_metadata(vc, [[1, 10, 8], [2, 4, 12]], pad_to=400)
    order, merged_order = (np.asarray(a) for a in window_order(vc, jnp.asarray(meta["window"])))
    assert sorted(order.tolist()) == list(range(400))
    assert (order.reshape(-1, 4) == order[::4, None] + np.arange(4)).all() and (order[::4] % 4 == 0).all()
    assert (order[::4] // 4 == merged_order).all()
    runs = lambda ids: [k for k, _ in itertools.groupby(ids)]
    for name, count in (("window", 12 + 1), ("frame", 3 + 1)):  # 6 + 2 x 3 windows, 1 + 2 frames, then padding
        assert len(runs(meta[name][order])) == len(set(meta[name].tolist())) == count, name
    assert len(runs(meta["window"])) > 13  # in image order a window's rows interleave with its neighbours'


@pytest.mark.parametrize("kernel_mode", ["auto", "pallas"])
def test_vision_features_match_transformers(pair, kernel_mode):
    """"auto" is the masked reference on CPU; "pallas" the flash kernel the GPU runs (interpreted)."""
    from jft.nn.vision import encode_patches, patch_metadata

    kind, hf, model = pair
    images = [_image(37, 29, 0), _image(20, 50, 1), _image(40, 40, 2)]  # 10x8, 4x12, 10x10 patch grids
    inputs = model.image_processor(images)
    meta = patch_metadata(model.config.vision, inputs["image_grid_thw"], pad_to=512)  # padding patches too
    pixels = np.zeros((512, inputs["pixel_values"].shape[1]), np.float32)
    pixels[: len(inputs["pixel_values"])] = inputs["pixel_values"]
    with jft.kernels.use(kernel_mode):  # a new function, traced under this mode
        ours = jax.jit(lambda p, x, m: encode_patches(model.config.vision, p, x, m))(model.params["vision"], pixels, meta)
    ours = np.asarray(ours)[: len(inputs["pixel_values"]) // model.config.vision.merge_unit]
    with torch.no_grad():
        theirs = hf.model.get_image_features(torch.tensor(inputs["pixel_values"]),
                                             torch.tensor(inputs["image_grid_thw"])).pooler_output
    theirs = torch.cat(theirs).numpy()
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_logits_match_transformers_for_image_and_text(pair):
    kind, hf, model = pair
    inputs = model.image_processor([_image(37, 29, 3), _image(20, 50, 4)])
    ids = np.asarray([_prompt_ids(model, inputs["image_grid_thw"])])
    ours = np.asarray(vlm.forward(model, ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]))
    theirs = _hf_logits(hf, model, ids, inputs["pixel_values"], inputs["image_grid_thw"])
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_logits_match_transformers_for_left_padded_batch(pair):
    kind, hf, model = pair
    inputs = model.image_processor([_image(24, 24, 5), _image(16, 40, 6)])
    rows = [_prompt_ids(model, inputs["image_grid_thw"][:1], ((5,), (6, 7))),
            _prompt_ids(model, inputs["image_grid_thw"][1:], ((8, 9, 10, 11), (12,)))]
    width = max(map(len, rows))
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, width - len(row):], mask[r, width - len(row):] = row, 1
    ours = np.asarray(vlm.forward(model, ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                                  image_grid_thw=inputs["image_grid_thw"]))
    theirs = _hf_logits(hf, model, ids, inputs["pixel_values"], inputs["image_grid_thw"], mask)
    real = mask == 1
    np.testing.assert_allclose(ours[real], theirs[real], atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(pair):
    kind, hf, model = pair
    inputs = model.image_processor([_image(28, 36, 7)])
    ids = _prompt_ids(model, inputs["image_grid_thw"], ((5, 6), (7, 8)))
    new = 12
    ours = jft.generate(model, {"input_ids": [ids], **inputs}, max_new_tokens=new, eos_token_ids=())
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor([ids]), pixel_values=torch.tensor(inputs["pixel_values"]),
                          image_grid_thw=torch.tensor(inputs["image_grid_thw"]),
                          mm_token_type_ids=torch.tensor([[int(t == model.config.image_token_id) for t in ids]]),
                          max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.ids[0] == ref[0, len(ids):].tolist()


# --- preprocessing ---------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{}, dict(patch_size=PATCH, merge_size=MERGE, **PIXELS),
                                      dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)])
def test_preprocessing_matches_transformers_image_processor(settings):
    theirs_proc = transformers.Qwen2VLImageProcessorPil(**settings)
    ours_proc = vlm.ImageProcessor(**settings)
    images = [_image(37, 29, 0), _image(20, 150, 1), _image(300, 90, 2, "RGBA"), _image(64, 64, 3, "L"),
              _image(700, 500, 4), _image(9, 13, 5)]
    for image in images:
        ours = ours_proc([image])
        theirs = theirs_proc(images=[image], return_tensors="np")
        np.testing.assert_array_equal(ours["image_grid_thw"], theirs["image_grid_thw"])
        np.testing.assert_allclose(ours["pixel_values"], theirs["pixel_values"], atol=1e-5, rtol=0)
    batch_ours = ours_proc(images[:3])
    batch_theirs = theirs_proc(images=images[:3], return_tensors="np")
    np.testing.assert_allclose(batch_ours["pixel_values"], batch_theirs["pixel_values"], atol=1e-5, rtol=0)


def test_image_inputs_of_every_kind_give_the_same_patches(tmp_path):
    image = _image(30, 44, 9)
    path = tmp_path / "im.png"
    image.save(path)
    proc = vlm.ImageProcessor(patch_size=PATCH, merge_size=MERGE, **PIXELS)
    ref = proc(image)["pixel_values"]
    for source in (str(path), path.read_bytes(), {"bytes": path.read_bytes()}, {"path": str(path)}, np.asarray(image)):
        np.testing.assert_array_equal(proc(source)["pixel_values"], ref)


# --- collator --------------------------------------------------------------------------------


def _colour_example(colour, rgb, size=(24, 32)):
    image = Image.new("RGB", size, rgb)
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What colour is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": f"It is {colour}."}]},
    ]}


def test_collator_labels_only_assistant_text_and_expands_images(pair):
    _, _, model = pair
    collator = VisionCollator(model)
    examples = [_colour_example("red", (255, 0, 0), (24, 32)), _colour_example("blue", (0, 0, 255), (40, 16))]
    batch = collator(examples)
    tok = model.tokenizer
    grids = batch["image_grid_thw"] if "image_grid_thw" in batch else None
    for row, colour in enumerate(("red", "blue")):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        assert tok.decode(labelled) == f"It is {colour}.<|im_end|>"
        n_image = int(np.sum(batch["input_ids"][row] == model.config.image_token_id))
        h, w = model.image_processor.target_size(*(examples[row]["messages"][0]["content"][0]["image"].size[::-1]))
        assert n_image == (h // PATCH) * (w // PATCH) // MERGE**2
        assert not np.any(batch["labels"][row][batch["input_ids"][row] == model.config.image_token_id] != -100)
    assert grids is None  # grids are folded into the vision metadata
    assert batch["pixel_values"].shape[0] % collator.patch_bucket == 0
    assert batch["rope_positions"].shape == (3, *batch["input_ids"].shape)


# --- LoRA ------------------------------------------------------------------------------------


def _random_b(lora, seed=1):
    key = jax.random.key(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lora.weights)
    out = []
    for i, (path, x) in enumerate(leaves):
        is_b = path[-1].key == "b"
        out.append(jax.random.normal(jax.random.fold_in(key, i), x.shape) * 0.05 if is_b else x)
    return LoRA(jax.tree_util.tree_unflatten(treedef, out), lora.config)


def _hf_inputs(model, batch):
    n = int(np.sum(batch["frame"] >= 0))
    grids = _grids_from_batch(model, batch)
    ids = batch["input_ids"].astype(np.int64)
    return dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(batch["segment_ids"].astype(np.int64)),
                pixel_values=torch.tensor(batch["pixel_values"][:n]), image_grid_thw=torch.tensor(grids),
                mm_token_type_ids=torch.tensor((ids == model.config.image_token_id).astype(np.int64)),
                labels=torch.tensor(batch["labels"].astype(np.int64)))


def _grids_from_batch(model, batch):
    """image_grid_thw recovered from the per-patch metadata (frames are single images here)."""
    grids = []
    for f in np.unique(batch["frame"][batch["frame"] >= 0]):
        hw = batch["hw"][batch["frame"] == f]
        grids.append([1, int(hw[:, 0].max()) + 1, int(hw[:, 1].max()) + 1])
    return np.asarray(grids, np.int64)


@pytest.mark.parametrize("flags", [dict(), dict(finetune_language_layers=False)], ids=["all", "vision-only"])
def test_lora_gradients_match_peft(pair, tmp_path, flags):
    import copy

    from peft import PeftModel

    from jft.vlm.export import adapter_tensors

    kind, hf, model = pair
    lora = _random_b(vtrain.init_lora(model, r=4, alpha=8, key=jax.random.key(3), **flags))
    save_lora(model, lora, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter", is_trainable=True)
    collator = VisionCollator(model)
    batch = collator([_colour_example("red", (250, 10, 10), (24, 32)), _colour_example("green", (0, 200, 0), (40, 16))])

    loss, grads = vtrain.loss_and_grads(model.config, model.params, lora, batch, remat="none")
    out = peft_model(**_hf_inputs(model, batch))
    out.loss.backward()
    assert abs(float(loss) - out.loss.item()) < 1e-5
    theirs = {n.replace(".default", ""): p.grad.numpy() for n, p in peft_model.named_parameters() if "lora_" in n}
    ours = adapter_tensors(model, grads)
    assert sorted(ours) == sorted(theirs) and ours
    for name, g in ours.items():
        err = np.linalg.norm(g - theirs[name]) / max(np.linalg.norm(theirs[name]), 1e-12)
        assert err < 1e-4, (name, err)


@pytest.mark.parametrize("remat, attn_impl", [("full", "causal"), ("save_dots", "flash"), ("offload", "xla")])
def test_training_step_gives_the_same_gradients_with_each_remat_and_attention(pair, remat, attn_impl, monkeypatch):
    """"causal" is the contract of cuDNN's kernel (causal, no mask) through XLA: exact for the
    collator's right-padded rows, as the masked reference ("none", "xla") is."""
    import jft.nn.attention

    _, _, model = pair
    masked = []
    xla_attention = jft.nn.attention.xla_attention
    monkeypatch.setattr(jft.nn.attention, "xla_attention", lambda *a, **k: masked.append(1) or xla_attention(*a, **k))
    lora = _random_b(vtrain.init_lora(model, r=4, alpha=8, key=jax.random.key(3)))
    batch = VisionCollator(model)([_colour_example("red", (250, 10, 10), (24, 32)),
                                   {"messages": [{"role": "user", "content": "Say it."},
                                                 {"role": "assistant", "content": "It is blue."}]}])
    assert (batch["segment_ids"] == 0).any()  # a padded row
    want_loss, want = vtrain.loss_and_grads(model.config, model.params, lora, batch, remat="none", attn_impl="xla")
    assert masked
    masked.clear()
    loss, grads = vtrain.loss_and_grads(model.config, model.params, lora, batch, remat=remat, attn_impl=attn_impl)
    assert bool(masked) == (attn_impl == "xla")  # the language layers took the implementation asked for
    assert abs(float(loss) - float(want_loss)) < 1e-5
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=1e-4)


def test_fit_shows_progress_plots_the_loss_and_stops_on_divergence(pair, tmp_path, capsys, monkeypatch):
    import optax

    _, _, model = pair
    collator = VisionCollator(model)
    examples = [_colour_example("red", (250, 10, 10)), _colour_example("blue", (10, 10, 250))]
    lora = vtrain.init_lora(model, r=2, key=jax.random.key(0))
    chosen = []
    make_step = vtrain.make_step
    monkeypatch.setattr(vtrain, "make_step", lambda *a, **k: chosen.append(k) or make_step(*a, **k))
    _, losses = vtrain.fit(model, lora, examples, collator, steps=3, batch_size=2, out_dir=str(tmp_path / "run"),
                           remat="save_dots", attention="causal")
    assert chosen == [{"remat": "save_dots", "attn_impl": "causal"}]
    assert len(losses) == 3 and all(np.isfinite(losses))
    shown = capsys.readouterr().err
    assert "vision sft" in shown and "3/3" in shown and "loss=" in shown
    assert os.path.getsize(tmp_path / "run" / "loss.png") > 0
    with pytest.raises(ValueError, match="remat policy 'some'"):
        vtrain.fit(model, lora, examples, collator, steps=1, remat="some")
    with pytest.raises(ValueError, match="attention implementation 'fast'"):
        vtrain.fit(model, lora, examples, collator, steps=1, attention="fast")
    with pytest.raises(jft.train.TrainingDiverged, match="step 2"):
        vtrain.fit(model, lora, examples, collator, steps=3, optimizer=optax.sgd(1e30), progress=False)


def test_fit_with_the_embedding_in_host_memory_trains_the_same(pair, monkeypatch):
    _, _, model = pair
    collator = VisionCollator(model)
    examples = [_colour_example("red", (250, 10, 10)), _colour_example("blue", (10, 10, 250))]
    steps_seen = []
    make_step = vtrain.make_step

    def spying_make_step(*a, **k):
        step = make_step(*a, **k)
        return lambda params, lora, opt_state, batch: steps_seen.append((set(params), set(batch))) or step(
            params, lora, opt_state, batch)

    monkeypatch.setattr(vtrain, "make_step", spying_make_step)
    run = lambda m, **kw: vtrain.fit(m, vtrain.init_lora(m, r=2, key=jax.random.key(0)), examples, collator, steps=2,
                                     batch_size=2, progress=False, **kw)
    _, want = run(model)
    offloaded = dataclasses.replace(model, params=dict(model.params))  # the fixture's model keeps its table
    _, got = run(offloaded, offload_embedding=True)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert all("embed" in params and "inputs_embeds" not in batch for params, batch in steps_seen[:2])
    assert all("embed" not in params and "inputs_embeds" in batch for params, batch in steps_seen[2:])
    assert isinstance(offloaded.params["embed"], np.ndarray)
    tied = dataclasses.replace(model, params=dict(model.params),
                               config=dataclasses.replace(model.config, text=dataclasses.replace(model.config.text,
                                                                                               tie_embeddings=True)))
    with pytest.raises(ValueError, match="untied lm_head"):
        run(tied, offload_embedding=True)


def test_lora_flags_choose_targets(pair):
    kind, _, model = pair
    lora = vtrain.init_lora(model, r=2, finetune_language_layers=False, finetune_attention_modules=False)
    assert lora.weights["layers"] == {}
    assert sorted(lora.weights["vision"]) == sorted(("gate", "up", "down") if kind == "qwen2_5_vl" else ("fc1", "fc2"))
    lora = vtrain.init_lora(model, r=2, finetune_vision_layers=False, finetune_mlp_modules=False)
    assert sorted(lora.weights["layers"]) == ["k", "o", "q", "v"] and lora.weights["vision"] == {}
    with pytest.raises(ValueError, match="at least one"):
        vtrain.init_lora(model, finetune_vision_layers=False, finetune_language_layers=False)


# --- NF4, export, fine-tuning ----------------------------------------------------------------


def test_nf4_language_model_matches_transformers_with_the_same_dequantized_weights(pair, tmp_path, monkeypatch):
    """Logits, and greedy generation whether the weights are made dense once (the program fits half
    the free device memory) or dequantized in every decoding step (no free memory reported, as on CPU)."""
    from jft import memory
    from jft.convert.vlm import save_vlm_params
    from jft.vlm.export import merged_params
    from jft.vlm.model import make_batch
    from tests.test_kernels_nf4 import loops_read_packed_bytes
    from tests.test_quant_models import note_dense_choices

    vgen = importlib.import_module("jft.vlm.generate")  # the module; jft.vlm.generate is also its function
    kind, hf, model = pair
    q = vlm.load(model.path, dtype="float32", quantize="nf4", progress=False)
    assert all(hasattr(q.params["layers"][n], "dequantize") for n in ("q", "k", "v", "o", "gate", "up", "down"))
    assert not any(hasattr(x, "dequantize") for x in jax.tree.leaves(q.params["vision"]))
    save_vlm_params(tmp_path / "deq", q.config, merged_params(q, None, "float32"), q.hf_config)
    cls = type(hf)
    ref = cls.from_pretrained(tmp_path / "deq", dtype=torch.float32).eval()
    inputs = q.image_processor([_image(24, 28, 11)])
    ids = np.asarray([_prompt_ids(q, inputs["image_grid_thw"], ((5,), (6, 7)))])
    ours = np.asarray(vlm.forward(q, ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]))
    np.testing.assert_allclose(ours, _hf_logits(ref, q, ids, inputs["pixel_values"], inputs["image_grid_thw"]),
                               atol=1e-4, rtol=0)
    dense = np.asarray(vlm.forward(model, ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]))
    assert not np.allclose(ours, dense, atol=1e-4)  # the language model really is quantized

    new = 8
    with torch.no_grad():
        want = ref.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(inputs["pixel_values"]),
                            image_grid_thw=torch.tensor(inputs["image_grid_thw"]),
                            mm_token_type_ids=torch.tensor((ids == q.config.image_token_id).astype(np.int64)),
                            max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, ids.shape[1]:].tolist()
    choices = note_dense_choices(monkeypatch, vgen)
    for free in (None, 2**40, 2**10):
        monkeypatch.setattr(memory, "free_device_bytes", lambda: free)
        assert vlm.generate(q, {"input_ids": ids.tolist(), **inputs}, max_new_tokens=new, eos_token_ids=()).ids[0] == want
    assert choices == [False, True, False]

    batch = {k: v for k, v in make_batch(q.config, ids, np.ones_like(ids), inputs["pixel_values"],
                                         inputs["image_grid_thw"]).items() if k in vgen._BATCH_KEYS}
    for dequantize in (True, False):
        jaxpr = vgen.generate_ids.trace(q.config, q.params, None, batch, jax.random.key(0), dequantize=dequantize,
                                        max_new_tokens=new, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                                        eos_ids=(), pad_id=0).jaxpr
        assert loops_read_packed_bytes(jaxpr) != dequantize


COLOURS = {"red": (230, 20, 20), "green": (20, 200, 30), "blue": (20, 40, 230), "yellow": (240, 230, 20)}


def test_finetune_lowers_loss_changes_answers_and_exports(pair, tmp_path):
    kind, _, model = pair
    examples = [_colour_example(name, rgb, size) for name, rgb in COLOURS.items() for size in ((24, 24), (32, 16))]
    collator = VisionCollator(model)
    lora = vtrain.init_lora(model, r=8, alpha=16, key=jax.random.key(0))
    import optax

    lora, losses = vtrain.fit(model, lora, examples, collator, steps=40, batch_size=4, optimizer=optax.adam(1e-2))
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:3])
    questions = [[m["messages"][0]] for m in examples[::2]]
    answers = vlm.generate(model, questions, max_new_tokens=16, lora=lora).text
    assert answers == [f"It is {name}." for name in COLOURS]
    before = vlm.generate(model, questions, max_new_tokens=16).text
    assert before != answers

    save_merged(model, lora, tmp_path / "merged", dtype="float32")
    cls = transformers.Qwen2VLForConditionalGeneration if kind == "qwen2_vl" else transformers.Qwen2_5_VLForConditionalGeneration
    merged = cls.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")) is cls
    prompt = VisionCollator(model).prompts(questions[:1])
    ids = np.asarray(prompt["input_ids"])
    ours = np.asarray(vlm.forward(model, ids, pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"],
                                  lora=lora))
    np.testing.assert_allclose(_hf_logits(merged, model, ids, prompt["pixel_values"], prompt["image_grid_thw"]), ours,
                               atol=1e-4, rtol=0)
    reloaded = jft.load(str(tmp_path / "merged"), dtype="float32", progress=False)  # dispatches to jft.vlm.load
    assert jft.generate(reloaded, questions, max_new_tokens=16).text == answers


# --- bad input -------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(pair, tmp_path):
    _, _, model = pair
    collator = VisionCollator(model)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(vlm.ImageError, match="cannot read image"):
        collator.encode({"messages": [{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "broken.png")}]}]})
    with pytest.raises(vlm.ImageError, match="not found"):
        vlm.load_image(str(tmp_path / "missing.png"))
    with pytest.raises(vlm.ImageError, match="aspect ratio"):
        model.image_processor(Image.new("RGB", (1000, 4)))
    inputs = model.image_processor([_image(24, 24, 1)])
    ids = _prompt_ids(model, inputs["image_grid_thw"], ((5,), (6,)))
    with pytest.raises(vlm.VisionInputError, match="image tokens"):
        vlm.forward(model, [ids[:-3] + ids[-2:]], **inputs)  # one image token too few
    with pytest.raises(vlm.VisionInputError, match="no images"):
        vlm.forward(model, [ids])
    with pytest.raises(vlm.VisionInputError, match="without image_grid_thw"):
        vlm.forward(model, [[5, 6]], pixel_values=inputs["pixel_values"])


def test_text_only_batch_uses_the_language_model_alone(pair):
    kind, hf, model = pair
    ids = np.asarray([[5, 6, 7, 8, 9, 10]])
    ours = np.asarray(vlm.forward(model, ids))
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    batch = VisionCollator(model)([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}])
    assert "pixel_values" not in batch
    loss, _ = vtrain.loss_and_grads(model.config, model.params, vtrain.init_lora(model, r=2), batch, remat="none")
    assert np.isfinite(float(loss))


@pytest.mark.parametrize("pair", ["qwen2_vl"], indirect=True)
def test_steps_that_do_not_fit_in_memory_say_what_to_change(pair):
    """XLA's masked attention over 2**17 tokens and a KV cache for 2**30 new ones: TiBs that XLA's CPU backend
    refuses before running anything (and a GPU's allocator too)."""
    _, _, model = pair
    collator = VisionCollator(model)
    long = {"messages": [{"role": "user", "content": "ab " * 2**16}, {"role": "assistant", "content": "yes"}]}
    assert len(collator.encode(long)["input_ids"]) > 2**17
    lora = vtrain.init_lora(model, r=2, key=jax.random.key(0))
    with pytest.raises(jft.OutOfMemoryError, match="the vision-language training step .* max_pixels") as info:
        vtrain.fit(model, lora, [long], collator, steps=1, batch_size=1, attention="xla")
    assert isinstance(info.value.__cause__, jax.errors.JaxRuntimeError)
    question = [[{"role": "user", "content": [{"type": "image", "image": _image(24, 32)}, {"type": "text", "text": "hi"}]}]]
    with pytest.raises(jft.OutOfMemoryError, match=f"generation .* max_new_tokens \\(now {2**30}\\)") as info:
        jft.generate(model, question, max_new_tokens=2**30)
    assert isinstance(info.value.__cause__, jax.errors.JaxRuntimeError)


def test_vision_sft_notebook_runs(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(os.path.dirname(__file__), "..", "notebooks", "vision_sft.ipynb"), as_version=4)
    env = {"JFT_VLM_OUT": str(tmp_path), "JFT_VLM_STEPS": "30"}
    nb.cells.insert(0, nbformat.v4.new_code_cell("import os\nos.environ.update(" + json.dumps(env) + ")\n"
                                                 "os.environ['JAX_PLATFORMS'] = 'cpu'"))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "loss" in printed, printed
    for name in ("red", "green", "blue", "yellow"):
        assert f"{name:>7}: It is {name}." in printed, printed
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "merged" / "config.json")
