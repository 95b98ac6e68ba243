// A photo in the browser, as the service sees it (bcnn/preprocess.py): upright by its EXIF orientation, a JPEG
// reduced as Pillow's draft mode decodes it, the centre crop cut from the source and resampled once with the
// antialiased bilinear (triangle) filter. And a large photo shrunk before it is uploaded.

const JPEG = /^image\/(jpeg|pjpeg)$/;

export async function decode(blob) {
  return createImageBitmap(blob, { imageOrientation: "from-image" });
}

function rgbaOf(bitmap) {
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.fillStyle = "#fff";  // the service puts transparent pixels on white
  context.fillRect(0, 0, bitmap.width, bitmap.height);
  context.drawImage(bitmap, 0, 0);
  return context.getImageData(0, 0, bitmap.width, bitmap.height).data;
}

// Pillow's JPEG draft: the largest of 1/2, 1/4, 1/8 that keeps both sides at least `size`.
function draftFactor(width, height, size) {
  const scale = Math.min(Math.floor(width / size), Math.floor(height / size));
  return [8, 4, 2].find((s) => scale >= s) || 1;
}

// RGB, channels last, reduced by `factor` with a box average (the DCT scaling of a JPEG decoder, near enough).
function reduced(rgba, width, height, factor) {
  const w = Math.ceil(width / factor), h = Math.ceil(height / factor);
  const out = new Float32Array(w * h * 3);
  for (let y = 0; y < h; y++) {
    const y1 = Math.min(height, (y + 1) * factor);
    for (let x = 0; x < w; x++) {
      const x1 = Math.min(width, (x + 1) * factor);
      let r = 0, g = 0, b = 0, n = 0;
      for (let sy = y * factor; sy < y1; sy++) {
        for (let sx = x * factor, i = (sy * width + sx) * 4; sx < x1; sx++, i += 4) {
          r += rgba[i]; g += rgba[i + 1]; b += rgba[i + 2]; n++;
        }
      }
      const o = (y * w + x) * 3;
      out[o] = Math.round(r / n); out[o + 1] = Math.round(g / n); out[o + 2] = Math.round(b / n);
    }
  }
  return { pixels: out, width: w, height: h };
}

// Python's round(): halves to even, as the service's crop box is computed.
function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// Pillow's (and torch's antialiased) bilinear coefficients from `inSize` samples to `outSize`.
function coefficients(inSize, outSize) {
  const scale = inSize / outSize, filterScale = Math.max(scale, 1), support = filterScale;
  const taps = [];
  for (let i = 0; i < outSize; i++) {
    const center = (i + 0.5) * scale;
    const min = Math.max(Math.trunc(center - support + 0.5), 0);
    const max = Math.min(Math.trunc(center + support + 0.5), inSize);
    const weights = [];
    let total = 0;
    for (let x = min; x < max; x++) {
      const w = Math.max(0, 1 - Math.abs((x - center + 0.5) / filterScale));
      weights.push(w);
      total += w;
    }
    taps.push({ min, weights: weights.map((w) => (total ? w / total : 0)) });
  }
  return taps;
}

// The crop box [left, top, w, h] of `src` resampled to side x side: horizontally, to uint8, then vertically (the
// order and rounding of Pillow's and torch's uint8 kernels). Out: uint8 NCHW [3, side, side].
function resampled(src, left, top, boxW, boxH, side) {
  const horizontal = coefficients(boxW, side), vertical = coefficients(boxH, side);
  const rows = new Uint8ClampedArray(boxH * side * 3);
  for (let y = 0; y < boxH; y++) {
    const rowStart = ((top + y) * src.width + left) * 3;
    for (let x = 0; x < side; x++) {
      const { min, weights } = horizontal[x];
      let r = 0, g = 0, b = 0;
      for (let k = 0; k < weights.length; k++) {
        const i = rowStart + (min + k) * 3;
        r += src.pixels[i] * weights[k]; g += src.pixels[i + 1] * weights[k]; b += src.pixels[i + 2] * weights[k];
      }
      const o = (y * side + x) * 3;
      rows[o] = Math.round(r); rows[o + 1] = Math.round(g); rows[o + 2] = Math.round(b);
    }
  }
  const plane = side * side, out = new Uint8Array(3 * plane);
  for (let y = 0; y < side; y++) {
    const { min, weights } = vertical[y];
    for (let x = 0; x < side; x++) {
      let r = 0, g = 0, b = 0;
      for (let k = 0; k < weights.length; k++) {
        const i = ((min + k) * side + x) * 3;
        r += rows[i] * weights[k]; g += rows[i + 1] * weights[k]; b += rows[i + 2] * weights[k];
      }
      const o = y * side + x;
      out[o] = Math.min(255, Math.max(0, Math.round(r)));
      out[plane + o] = Math.min(255, Math.max(0, Math.round(g)));
      out[2 * plane + o] = Math.min(255, Math.max(0, Math.round(b)));
    }
  }
  return out;
}

// uint8 [3, crop, crop] pixels of a photo for a model with this preprocessing ({resize_size, crop_size}).
export async function modelInput(blob, preprocess) {
  const bitmap = await decode(blob);
  try {
    const factor = JPEG.test(blob.type) ? draftFactor(bitmap.width, bitmap.height, preprocess.resize_size) : 1;
    const src = reduced(rgbaOf(bitmap), bitmap.width, bitmap.height, factor);
    const scale = preprocess.resize_size / Math.min(src.width, src.height);
    const boxW = Math.max(1, Math.min(src.width, roundHalfEven(preprocess.crop_size / scale)));
    const boxH = Math.max(1, Math.min(src.height, roundHalfEven(preprocess.crop_size / scale)));
    const left = Math.floor((src.width - boxW) / 2), top = Math.floor((src.height - boxH) / 2);
    return resampled(src, left, top, boxW, boxH, preprocess.crop_size);
  } finally {
    bitmap.close();
  }
}

export const UPLOAD_MAX_SIDE = 1024;

// A photo whose longer side is over `maxSide` px, as an upright JPEG of that size; any other photo (and a file the
// browser cannot decode: the service says why) as it is, so its answer does not change.
export async function shrunkForUpload(file, maxSide = UPLOAD_MAX_SIDE, quality = 0.9) {
  let bitmap;
  try {
    bitmap = await decode(file);
  } catch (_) {
    return file;
  }
  try {
    const longer = Math.max(bitmap.width, bitmap.height);
    if (longer <= maxSide) return file;
    const width = Math.max(1, Math.round(bitmap.width * maxSide / longer));
    const height = Math.max(1, Math.round(bitmap.height * maxSide / longer));
    const canvas = new OffscreenCanvas(width, height);
    const context = canvas.getContext("2d");
    context.fillStyle = "#fff";
    context.fillRect(0, 0, width, height);
    context.imageSmoothingQuality = "high";
    context.drawImage(bitmap, 0, 0, width, height);
    const blob = await canvas.convertToBlob({ type: "image/jpeg", quality });
    if (blob.size >= file.size) return file;
    return new File([blob], file.name.replace(/\.[^.]*$/, "") + ".jpg", { type: "image/jpeg" });
  } finally {
    bitmap.close();
  }
}
