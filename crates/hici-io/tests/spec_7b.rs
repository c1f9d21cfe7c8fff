//! A Llama-2-7B + HiCI-16k layout (all 32 layers, real names and shapes) as sparse files:
//! headers only, no data on disk. The validator and the header-only plan must give exactly the
//! spec's numbers (§1.1, §2.2, §2.3).

mod common;

use common::TempDir;
use hici_io::validate::validate_dirs;
use hici_io::{plan_checkpoint, LoadOptions};
use std::fs::File;
use std::io::Write;
use std::path::Path;

const H: usize = 4096;
const I: usize = 11008;
const L: usize = 32;

/// A safetensors file with these tensors whose data section is a hole (reads as zeros).
fn sparse_safetensors(path: &Path, dtype: &str, tensors: &[(String, Vec<usize>)]) {
    let elem = if dtype == "F32" { 4 } else { 2 };
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let len = shape.iter().product::<usize>() * elem;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut h = serde_json::to_vec(&header).expect("json");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut f = File::create(path).expect("create");
    f.write_all(&(h.len() as u64).to_le_bytes()).expect("write");
    f.write_all(&h).expect("write");
    f.set_len((8 + h.len() + offset) as u64).expect("set_len");
}

fn layout_7b(root: &Path) {
    let base = root.join("base");
    let adapter = root.join("adapter");
    std::fs::create_dir_all(&base).expect("mkdir");
    std::fs::create_dir_all(&adapter).expect("mkdir");
    std::fs::write(
        base.join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-05, "rope_scaling": null, "hidden_act": "silu",
            "tie_word_embeddings": false, "torch_dtype": "float16"}"#,
    )
    .expect("config");
    // Base: two shards, as the HF repo.
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new(), Vec::new()];
    shards[0].push(("model.embed_tokens.weight".into(), vec![32000, H]));
    for l in 0..L {
        let s = &mut shards[usize::from(l >= 24)];
        let p = format!("model.layers.{l}.");
        for n in ["q", "k", "v", "o"] {
            s.push((format!("{p}self_attn.{n}_proj.weight"), vec![H, H]));
        }
        s.push((format!("{p}mlp.gate_proj.weight"), vec![I, H]));
        s.push((format!("{p}mlp.up_proj.weight"), vec![I, H]));
        s.push((format!("{p}mlp.down_proj.weight"), vec![H, I]));
        s.push((format!("{p}input_layernorm.weight"), vec![H]));
        s.push((format!("{p}post_attention_layernorm.weight"), vec![H]));
    }
    shards[1].push(("model.norm.weight".into(), vec![H]));
    shards[1].push(("lm_head.weight".into(), vec![32000, H]));
    let mut weight_map = serde_json::Map::new();
    for (i, s) in shards.iter().enumerate() {
        let name = format!("model-0000{}-of-00002.safetensors", i + 1);
        sparse_safetensors(&base.join(&name), "F16", s);
        for (k, _) in s {
            weight_map.insert(k.clone(), name.clone().into());
        }
    }
    std::fs::write(
        base.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .expect("index");

    // trainable_params (f32, 642 tensors, spec §2.3) and the PEFT adapter (bf16, 768 tensors).
    let mut tp = vec![("model.embed_tokens.weight".to_string(), vec![32001, H])];
    let mut lora = Vec::new();
    for l in 0..L {
        let p = format!("model.layers.{l}.");
        let lc = format!("{p}self_attn.local_constructor.");
        let gi = format!("{p}self_attn.global_integrator.");
        tp.push((format!("{p}input_layernorm.weight"), vec![H]));
        tp.push((format!("{p}post_attention_layernorm.weight"), vec![H]));
        tp.push((format!("{lc}memory_slots"), vec![8, H]));
        for n in ["q", "k", "v"] {
            tp.push((format!("{lc}{n}_proj.weight"), vec![512, H]));
        }
        tp.push((format!("{lc}o_proj.weight"), vec![H, 512]));
        tp.push((format!("{gi}shared_compressor.0.weight"), vec![128, H]));
        tp.push((format!("{gi}shared_compressor.1.weight"), vec![128]));
        tp.push((format!("{gi}shared_compressor.1.bias"), vec![128]));
        tp.push((format!("{gi}stat_expand.0.weight"), vec![512, 128]));
        tp.push((format!("{gi}stat_expand.1.weight"), vec![512]));
        tp.push((format!("{gi}stat_expand.1.bias"), vec![512]));
        tp.push((format!("{gi}global_queries"), vec![4, 512]));
        for n in ["q", "k", "v", "o"] {
            tp.push((format!("{gi}{n}_proj.weight"), vec![512, 512]));
        }
        tp.push((format!("{gi}expand.weight"), vec![H, 512]));
        tp.push((format!("{gi}expand_scale_param"), vec![]));
        let peft = format!("base_model.model.{p}self_attn.");
        for (m, i, o) in [
            ("q_proj", H, H),
            ("k_proj", H, H),
            ("v_proj", H, H),
            ("o_proj", H, H),
            ("local_constructor.q_proj", H, 512),
            ("local_constructor.k_proj", H, 512),
            ("local_constructor.v_proj", H, 512),
            ("local_constructor.o_proj", 512, H),
            ("global_integrator.q_proj", 512, 512),
            ("global_integrator.k_proj", 512, 512),
            ("global_integrator.v_proj", 512, 512),
            ("global_integrator.o_proj", 512, 512),
        ] {
            lora.push((format!("{peft}{m}.lora_A.weight"), vec![8, i]));
            lora.push((format!("{peft}{m}.lora_B.weight"), vec![o, 8]));
        }
    }
    tp.push(("model.norm.weight".into(), vec![H]));
    assert_eq!(tp.len(), 642);
    assert_eq!(lora.len(), 768);
    sparse_safetensors(&adapter.join("trainable_params.safetensors"), "F32", &tp);
    sparse_safetensors(&adapter.join("adapter_model.safetensors"), "BF16", &lora);
    std::fs::write(
        adapter.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": false,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "modules_to_save": null, "inference_mode": true}"#,
    )
    .expect("adapter config");
}

#[test]
fn llama2_7b_hici_layout_matches_the_spec_numbers() {
    let dir = TempDir::new("spec-7b");
    layout_7b(dir.path());
    let (base, adapter) = (dir.path().join("base"), dir.path().join("adapter"));
    let v = validate_dirs(&base, Some(&adapter), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(v.is_ok(), "{:?} {:?}", v.problems, v.unexpected);
    let spec = v.spec_7b.as_ref().expect("7B configuration recognised");
    assert!(spec.matches, "{spec:?}");
    assert_eq!(v.counts_found.base, 6_738_415_616);
    assert_eq!(v.counts_found.lora, 14_155_776);
    assert_eq!(v.counts_found.hici, 389_128_224);
    // Overrides: embedding 32001 x 4096 + 65 norms (spec §2.3: with HiCI 520,470,560 f32).
    assert_eq!(v.counts_found.overrides, 131_076_096 + 266_240);
    assert_eq!(v.counts_found.overrides + v.counts_found.hici, 520_470_560);
    assert_eq!(v.counts_expected, v.counts_found);
    assert_eq!(
        v.rope_factor, 4.0,
        "released 16K checkpoint: s = 4 (spec §1.3)"
    );
    assert_eq!(v.vocab.appended_lm_head_rows, 1);

    // The header-only plan agrees, and needs no tensor data.
    let plan = plan_checkpoint(&base, Some(&adapter), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plan.config.llama.vocab_size, 32001);
    assert_eq!(plan.config.rope_factor, 4.0);
    assert_eq!(plan.report.counts.lora, 14_155_776);
    assert_eq!(plan.report.counts.hici, 389_128_224);
    assert_eq!(plan.tensors()["lm_head.weight"].shape, vec![32001, H]);

    // One LoRA factor of the wrong rank and a stray tensor: listed, not fatal to the report.
    let mut bad = Vec::new();
    for l in 0..L {
        let peft = format!("base_model.model.model.layers.{l}.self_attn.");
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            let r = if l == 3 && m == "v_proj" { 4 } else { 8 };
            bad.push((format!("{peft}{m}.lora_A.weight"), vec![r, H]));
            bad.push((format!("{peft}{m}.lora_B.weight"), vec![H, 8]));
        }
    }
    bad.push(("base_model.model.lm_head.lora_A.weight".into(), vec![8, H]));
    sparse_safetensors(&adapter.join("adapter_model.safetensors"), "BF16", &bad);
    let v = validate_dirs(&base, Some(&adapter), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!v.is_ok());
    let wrong: Vec<_> = v.bad_keys().map(|k| k.name.as_str()).collect();
    assert_eq!(wrong, vec!["model.layers.3.self_attn.v_proj.lora_A.weight"]);
    assert_eq!(v.unexpected.len(), 1);
    // Main-attention-only LoRA: the HiCI projections' factors are listed as absent (optional).
    assert_eq!(v.absent_optional().count(), 32 * 8 * 2);
    assert!(!v.spec_7b.expect("7B").lora);
}
