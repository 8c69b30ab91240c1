// Whether the kernel's messages reach this view. anywidget drops every message from the kernel
// to a model whose set-up took longer than its deadline (2 s; a page busy drawing other widgets
// can take longer): the view still draws, and clicks still reach the kernel, but no answer is
// ever shown. So the view asks the kernel once ("ping") and says so in the view when no answer
// ("pong") comes: waiting for a busy kernel is normal, and reloading the page mends the rest.

export const SILENT_AFTER_MS = 15000;

export const NOTE_TEXT =
  "No answer from the kernel for 15 s. If it is running a cell, the answer comes when the cell " +
  "ends; if it is idle, reload the page: this view missed the start of its link to the kernel " +
  "(the page was slow to load), and what a click computes cannot be shown here.";

const NOTE_CSS =
  "margin:4px 0;padding:4px 8px;border:1px solid #d33;color:#a00000;font-size:12px;" +
  "white-space:normal;max-width:640px";

// Ask the kernel once; root.dataset.kernelLink becomes "waiting", then "ok" at the answer or
// "silent" when none came in SILENT_AFTER_MS (a note, as text, says what to do, until an answer).
// Returns the clean-up for the view's removal.
export function watchKernelLink(model, root) {
  const note = document.createElement("div");
  note.className = "mvz-link-note";
  note.setAttribute("style", NOTE_CSS);
  note.style.display = "none";
  root.prepend(note);
  root.dataset.kernelLink = "waiting";
  const answered = (msg) => {
    if (!msg || msg.op !== "pong") return;
    root.dataset.kernelLink = "ok";
    note.style.display = "none";
  };
  model.on("msg:custom", answered);
  const timer = setTimeout(() => {
    if (root.dataset.kernelLink !== "waiting") return;
    root.dataset.kernelLink = "silent";
    note.textContent = NOTE_TEXT;
    note.style.display = "";
  }, SILENT_AFTER_MS);
  model.send({ op: "ping" });
  return () => {
    clearTimeout(timer);
    model.off("msg:custom", answered);
  };
}
