// The service's model on the phone: the ONNX file the service exports for phones (bcnn/phone.py), run by ONNX
// Runtime Web (WebAssembly), with everything else read from the file's own metadata: labels, preprocessing, and
// the rules of an answer (bcnn/predict.py's rank_logits, here for one photo).

import { modelInput } from "./photo.js";

// ModelProto.metadata_props (field 14): StringStringEntryProto {key = 1, value = 2}. The graph is skipped unread.
export function readMetadata(bytes) {
  const text = new TextDecoder();
  let pos = 0;
  const varint = (end) => {
    let value = 0, shift = 0, byte;
    do {
      if (pos >= end) throw new Error("the model file is truncated");
      byte = bytes[pos++];
      value += (byte & 0x7f) * 2 ** shift;
      shift += 7;
    } while (byte & 0x80);
    return value;
  };
  const fields = (start, end, visit) => {
    pos = start;
    while (pos < end) {
      const key = varint(end), field = Math.floor(key / 8), wire = key % 8;
      if (wire === 0) varint(end);
      else if (wire === 1) pos += 8;
      else if (wire === 5) pos += 4;
      else if (wire === 2) {
        const length = varint(end), from = pos;
        pos += length;
        if (pos > end) throw new Error("the model file is truncated");
        visit(field, from, pos);
      } else throw new Error("the model file is not an ONNX model");
    }
  };
  const metadata = {};
  fields(0, bytes.length, (field, from, to) => {
    if (field !== 14) return;
    const saved = pos;
    let key = "", value = "";
    fields(from, to, (f, a, b) => {
      if (f === 1) key = text.decode(bytes.subarray(a, b));
      if (f === 2) value = text.decode(bytes.subarray(a, b));
    });
    metadata[key] = value;
    pos = saved;
  });
  if (metadata.format !== "waterbirds-onnx") throw new Error("the model file was not exported by bcnn export");
  const json = (name, absent = null) => (name in metadata ? JSON.parse(metadata[name]) : absent);
  const categories = json("categories"), answers = json("answer_indices"), names = json("display_names", {});
  const labels = answers.map((i) => categories[i]);
  return {
    name: metadata.name, version: metadata.version, preprocess: json("preprocess"), input: json("input"),
    categories, answers, labels, names: labels.map((label) => names[label] || label),
    birds: json("bird_indices"),  // null, or absent from a file saved before it: the answer classes alone
    waterbirdThreshold: parseFloat(metadata.waterbird_threshold), speciesRule: json("species_rule"),
  };
}

let ort = null;

async function runtime(paths) {
  if (ort === null) {
    ort = await import(new URL(paths["ort.wasm.min.mjs"], document.baseURI).href);
    ort.env.wasm.wasmPaths = { mjs: new URL(paths["ort-wasm-simd-threaded.mjs"], document.baseURI).href,
                               wasm: new URL(paths["ort-wasm-simd-threaded.wasm"], document.baseURI).href };
    // Threads need a cross-origin isolated page (the service sends the headers); each one is a core of the phone.
    ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  }
  return ort;
}

// rank_logits for one photo: softmax, the answer classes renormalised, is_waterbird by the mass on them (else
// is_bird by the mass on the bird classes), whether the model knows the species and how sure it is (the species
// rule: max logit, Platt-calibrated), and the level the answer rolls up to.
export function answer(logits, meta, topK) {
  let max = -Infinity;
  for (const v of logits) max = Math.max(max, v);
  let total = 0;
  const exp = Array.from(logits, (v) => { const e = Math.exp(v - max); total += e; return e; });
  const probs = meta.answers.map((i) => exp[i] / total);
  const mass = probs.reduce((a, b) => a + b, 0);
  const ranked = probs.map((p, i) => ({ i, score: p / Math.max(mass, 1e-12) })).sort((a, b) => b.score - a.score);
  const isWaterbird = mass >= meta.waterbirdThreshold;
  const birdMass = meta.birds ? meta.birds.reduce((sum, i) => sum + exp[i] / total, 0) : mass;
  const isBird = isWaterbird || birdMass >= meta.waterbirdThreshold;
  let known = isWaterbird, confidence = Math.max(...probs);
  if (meta.speciesRule) {
    const score = Math.max(...meta.answers.map((i) => logits[i]));
    known = isWaterbird && score >= meta.speciesRule.threshold;
    confidence = 1 / (1 + Math.exp(-(meta.speciesRule.slope * score + meta.speciesRule.intercept)));
  }
  return {
    level: known ? "species" : isWaterbird ? "waterbird" : isBird ? "bird" : "not_a_bird",
    is_bird: isBird, bird_score: birdMass,
    is_waterbird: isWaterbird, waterbird_score: mass, species_known: known, species_confidence: known ? confidence : null,
    predictions: ranked.slice(0, topK).map((r) => ({ label: meta.labels[r.i], name: meta.names[r.i], score: r.score })),
  };
}

export class PhoneClassifier {
  static async create(runtimePaths, modelBytes) {
    const meta = readMetadata(modelBytes);
    const ortModule = await runtime(runtimePaths);
    const session = await ortModule.InferenceSession.create(modelBytes, { executionProviders: ["wasm"] });
    return new PhoneClassifier(ortModule, session, meta);
  }

  constructor(ortModule, session, meta) {
    this.ort = ortModule;
    this.session = session;
    this.meta = meta;
  }

  // The service's answer body, made here: {model, is_waterbird, ..., predictions, timing_ms}.
  async classify(blob, topK = 5) {
    const start = performance.now();
    const side = this.meta.preprocess.crop_size;
    const pixels = await modelInput(blob, this.meta.preprocess);
    const preprocessed = performance.now();
    const images = new this.ort.Tensor("uint8", pixels, [1, 3, side, side]);
    const output = await this.session.run({ [this.meta.input.name]: images });
    const logits = output[this.session.outputNames[0]].data;
    const done = performance.now();
    return {
      model: { name: this.meta.name, version: this.meta.version },
      ...answer(logits, this.meta, topK),
      timing_ms: { preprocess: preprocessed - start, inference: done - preprocessed, total: done - start },
    };
  }
}
