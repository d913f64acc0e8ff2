// The page of `mnistsum serve`: draw (Pointer Events), pick a number, ask /api/predict, show
// both heads and the 28 x 28 input. No framework, no build step, nothing from another origin.
"use strict";

const STROKE = 22;        // pen width on the 280 px pad: about MNIST's stroke once scaled to 20 px
const DEBOUNCE_MS = 250;  // wait this long after a stroke before asking, so quick strokes make one request
// The pad is sent at half size: still 7 times the 20 px the digit is scaled to, and a quarter of
// the pixels for the server to decode and prepare (docs/serve.md#load).
const SENT_SIZE = 140;

const pad = document.getElementById("pad");
const pen = pad.getContext("2d");
const result = document.getElementById("result");
const statusLine = document.getElementById("status");
let number = 3;
let source = null;        // what the last prediction was of: "pad" or a File
let timer = null;
let requestSeq = 0;       // answers to older requests are dropped
let runId = null;

function clearPad() {
  pen.fillStyle = "#fff";
  pen.fillRect(0, 0, pad.width, pad.height);
}

function padPoint(event) {
  const box = pad.getBoundingClientRect();
  return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
}

// ------------------------------------------------------------------ drawing
let drawing = null;  // the pointerId of the stroke in progress

pad.addEventListener("pointerdown", (event) => {
  if (drawing !== null || event.button > 0) return;
  event.preventDefault();
  drawing = event.pointerId;
  pad.setPointerCapture(event.pointerId);
  if (source !== "pad") clearPad();  // a picked file was showing: start a fresh drawing
  source = "pad";
  clearTimeout(timer);
  const [x, y] = padPoint(event);
  pen.lineWidth = STROKE;
  pen.lineCap = "round";
  pen.lineJoin = "round";
  pen.strokeStyle = "#000";
  pen.beginPath();
  pen.moveTo(x, y);
  pen.lineTo(x + 0.01, y);  // a dot when the pen does not move
  pen.stroke();
});

pad.addEventListener("pointermove", (event) => {
  if (event.pointerId !== drawing) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const each of events.length ? events : [event]) {
    const [x, y] = padPoint(each);
    pen.lineTo(x, y);
  }
  pen.stroke();
});

function endStroke(event) {
  if (event.pointerId !== drawing) return;
  drawing = null;
  schedule();
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

function schedule() {
  clearTimeout(timer);
  result.dataset.status = "waiting";
  timer = setTimeout(predict, DEBOUNCE_MS);
}

document.getElementById("clear").addEventListener("click", () => {
  clearTimeout(timer);
  clearPad();
  source = null;
  requestSeq += 1;
  showAnswer(null);
  statusLine.textContent = "Cleared. Draw a digit.";
  result.dataset.status = "idle";
});

// ------------------------------------------------------------------ files
function useFile(file) {
  if (!file) return;
  clearPad();
  source = file;
  predict();
}
document.getElementById("file").addEventListener("change", (event) => useFile(event.target.files[0]));
pad.addEventListener("dragover", (event) => { event.preventDefault(); pad.classList.add("dragging"); });
pad.addEventListener("dragleave", () => pad.classList.remove("dragging"));
pad.addEventListener("drop", (event) => {
  event.preventDefault();
  pad.classList.remove("dragging");
  useFile(event.dataTransfer.files[0]);
});

// ------------------------------------------------------------------ the number
const numbers = document.getElementById("numbers");
for (let n = 0; n <= 9; n++) {
  const label = document.createElement("label");
  const input = document.createElement("input");
  input.type = "radio";
  input.name = "number";
  input.value = String(n);
  input.checked = n === number;
  label.append(input, String(n));
  label.classList.toggle("chosen", input.checked);
  numbers.append(label);
  input.addEventListener("change", () => {
    number = n;
    for (const other of numbers.querySelectorAll("label")) other.classList.toggle("chosen", other.firstChild.checked);
    if (source !== null) { clearTimeout(timer); predict(); }  // at once: no stroke to wait for
  });
}

// ------------------------------------------------------------------ asking the model
const sent = document.createElement("canvas");
sent.width = sent.height = SENT_SIZE;

function padBlob() {
  const copy = sent.getContext("2d");
  copy.imageSmoothingQuality = "high";
  copy.drawImage(pad, 0, 0, SENT_SIZE, SENT_SIZE);
  return new Promise((resolve) => sent.toBlob(resolve, "image/png"));
}

async function predict() {
  if (source === null) return;
  const seq = ++requestSeq;
  result.dataset.status = "waiting";
  statusLine.textContent = "Asking the model…";
  const blob = source === "pad" ? await padBlob() : source;
  const type = ["image/png", "image/jpeg"].includes(blob.type) ? blob.type : "application/octet-stream";
  const body = await blob.arrayBuffer();  // bytes, not a file reference: one plain request body
  let answer;
  try {
    const response = await fetch(`/api/predict?number=${number}`, { method: "POST", body, headers: { "Content-Type": type } });
    answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
  } catch (error) {
    if (seq !== requestSeq) return;
    showAnswer(null);
    statusLine.textContent = `Not predicted: ${error.message}`;
    result.dataset.status = "error";
    result.dataset.seq = String(seq);
    return;
  }
  if (seq !== requestSeq) return;
  showAnswer(answer);
  statusLine.textContent = `Digit head: ${answer.digit}. Sum head, with number ${answer.number}: ${answer.sum}. (Run ${answer.run_id}.)`;
  result.dataset.status = "done";
  result.dataset.seq = String(seq);
  if (answer.run_id !== runId || answer.problem) loadCard();
}

function showAnswer(answer) {
  document.getElementById("digit").textContent = answer ? String(answer.digit) : "–";
  document.getElementById("sum").textContent = answer ? String(answer.sum) : "–";
  bars(document.getElementById("digit-bars"), answer ? answer.digit_probabilities : new Array(10).fill(0));
  bars(document.getElementById("sum-bars"), answer ? answer.sum_probabilities : new Array(19).fill(0));
  const seen = document.getElementById("seen").getContext("2d");
  const pixels = seen.createImageData(28, 28);
  for (let i = 0; i < 28 * 28; i++) {
    const value = answer ? answer.input[Math.floor(i / 28)][i % 28] : 0;
    pixels.data.set([value, value, value, 255], 4 * i);
  }
  seen.putImageData(pixels, 0, 0);
}

function bars(list, probabilities) {
  const top = probabilities.indexOf(Math.max(...probabilities));
  list.replaceChildren(...probabilities.map((p, i) => {
    const item = document.createElement("li");
    item.classList.toggle("top", p > 0 && i === top);
    const name = document.createElement("span");
    name.textContent = String(i);
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(100 * p).toFixed(1)}%`;
    item.append(name, track, value);
    return item;
  }));
}

// ------------------------------------------------------------------ the run card
function percent(value) {
  return typeof value === "number" ? `${(100 * value).toFixed(2)}%` : "–";
}

async function loadCard() {
  let card;
  try {
    card = await (await fetch("/api/model")).json();
  } catch (error) {
    return;
  }
  runId = card.run_id;
  const problem = document.getElementById("problem");
  problem.hidden = !card.problem;
  problem.textContent = card.problem ? `The newest model is not serving: ${card.problem}` : "";
  const rows = [
    ["Architecture", card.arch],
    ["Run id", card.run_id],
    ["Kept epoch", card.epoch],
    ["Model loaded", card.loaded_at],
  ];
  for (const split of ["val", "test"]) {
    const metrics = card.evaluations[split];
    rows.push([`${split} accuracy (digit / sum)`,
      metrics ? `${percent(metrics.digit_accuracy)} / ${percent(metrics.sum_accuracy)} on ${metrics.rows} rows`
              : `not evaluated (mnistsum evaluate --split ${split})`]);
  }
  document.getElementById("card").replaceChildren(...rows.flatMap(([name, value]) => {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value === null || value === undefined ? "–" : String(value);
    return [dt, dd];
  }));
  document.getElementById("plots").replaceChildren(...card.plots.map((url) => {
    const link = document.createElement("a");
    link.href = url;
    const image = document.createElement("img");
    image.src = url;
    image.alt = `plot ${url.split("/").pop()}`;
    image.loading = "lazy";
    link.append(image);
    return link;
  }));
}

clearPad();
showAnswer(null);
loadCard();
