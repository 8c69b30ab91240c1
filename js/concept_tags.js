// ConceptTags: a list of short texts (concepts) shown as tags, each with a remove button, and an
// input that adds one on Enter. anywidget ESM; bundled into multiviz_widgets/static/.
//
// Traits: value [string], key (string: what the tags belong to), disabled (bool), placeholder.
// The view never changes value itself: an edit is a message {op: "add" | "remove", key, text}
// to the kernel, which applies it to the key it names (also when the row shows another key by
// the time it arrives) and sends the new value back, and answers an "add" with
// {op: "answer", key, text, taken}: a refused concept (too long, a pasted tab) comes back into
// the emptied input, to correct rather than type again, when the row still shows the key it
// was typed for (the kernel's message names the key otherwise: the text is not put into
// another neuron's or unit's input). The answer goes to every view of the model: only the view
// that sent the text takes it back (each keeps the adds it sent that await an answer).
// The root carries data-lm-suppress-shortcuts, so that JupyterLab does not take the keys typed
// into the input for notebook shortcuts (Enter would otherwise never reach it), and
// data-render-count, incremented after each redraw, so tests can wait on it.
// Concepts come from people and files: they are only ever set through textContent, and as
// attributes (a tag's title, its remove button's aria-label "remove concept <text>").
// A long concept is cut with an ellipsis (its title holds it whole). When a redraw (the
// kernel's answer to a remove) drops the focused remove button, the focus goes to the remove
// button now at its place (the next tag's, else the last one's), else to the input. When the
// row becomes disabled with the focus on one of its buttons or its input, the focus goes to
// the row itself (tabindex -1), not to the page's body.

import { watchKernelLink } from "./lib/kernel_link.js";

const CSS = `
.mvz-tags { display: flex; flex-wrap: wrap; align-items: center; gap: 4px; min-height: 26px; font-family: var(--jp-ui-font-family, sans-serif); font-size: 13px; }
.mvz-tags .mvz-tag { display: inline-flex; align-items: center; gap: 2px; padding: 1px 2px 1px 8px; border-radius: 10px; background: #e3eefb; border: 1px solid #9ec1ea; color: #123; white-space: pre; max-width: 100%; box-sizing: border-box; }
.mvz-tags .mvz-tag-text { max-width: 32ch; min-width: 0; overflow: hidden; text-overflow: ellipsis; }
.mvz-tags .mvz-tag-remove { flex: 0 0 auto; border: none; background: none; cursor: pointer; padding: 0 5px; font-size: 14px; line-height: 1; color: #345; }
.mvz-tags .mvz-tag-remove:focus-visible { outline: 2px solid #1565c0; outline-offset: 0; border-radius: 8px; }
.mvz-tags .mvz-tag-remove:hover { color: #a00; }
.mvz-tags input.mvz-tag-input { flex: 1 1 160px; min-width: 120px; border: 1px solid #bbb; border-radius: 3px; padding: 2px 5px; font: inherit; }
.mvz-tags.mvz-disabled .mvz-tag-remove { display: none; }
`;

function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "mvz-tags";
  root.setAttribute("data-lm-suppress-shortcuts", "true");
  root.tabIndex = -1;                    // where the focus goes when the row is disabled
  const style = document.createElement("style");
  style.textContent = CSS;
  root.appendChild(style);
  const list = document.createElement("span");
  list.style.display = "contents";
  root.appendChild(list);
  const input = document.createElement("input");
  input.type = "text";
  input.className = "mvz-tag-input";
  input.setAttribute("aria-label", "add a concept");
  root.appendChild(input);
  el.appendChild(root);
  const unwatch = watchKernelLink(model, root);
  let renderCount = 0;

  const edit = (op, text) => model.send({ op, key: model.get("key"), text });
  // the adds this view sent that await the kernel's answer, oldest first: {n, key, text}
  const pending = [];
  let typed = 0;                         // adds sent so far (n: the order they were typed in)
  let held = null;                       // a refused add waiting for later ones' answers

  const draw = () => {
    const value = model.get("value") || [];
    const disabled = !!model.get("disabled");
    // the focused remove button (its tag's index), which the redraw drops
    const active = document.activeElement;
    const focused = active && list.contains(active) && active.closest(".mvz-tag");
    const at = focused ? Number(focused.getAttribute("data-index")) : -1;
    list.replaceChildren();
    value.forEach((text, i) => {
      const tag = document.createElement("span");
      tag.className = "mvz-tag";
      tag.setAttribute("data-index", String(i));
      const label = document.createElement("span");
      label.className = "mvz-tag-text";
      label.textContent = text;
      label.title = text;
      tag.appendChild(label);
      const remove = document.createElement("button");
      remove.className = "mvz-tag-remove";
      remove.type = "button";
      remove.textContent = "\u00d7";
      remove.title = `remove concept ${text}`;
      remove.setAttribute("aria-label", `remove concept ${text}`);
      remove.addEventListener("click", () => {
        if (!model.get("disabled")) edit("remove", text);
      });
      tag.appendChild(remove);
      list.appendChild(tag);
    });
    input.disabled = disabled;
    input.placeholder = model.get("placeholder") || "";
    root.classList.toggle("mvz-disabled", disabled);
    if (at >= 0 && !disabled) {
      const buttons = list.querySelectorAll(".mvz-tag-remove");
      const next = buttons.length ? buttons[Math.min(at, buttons.length - 1)] : input;
      next.focus();
    } else if (disabled && (at >= 0 || active === input)) {
      root.focus({ preventScroll: true });  // its control is hidden or disabled now
    }
    renderCount += 1;
    root.setAttribute("data-render-count", String(renderCount));
  };

  input.addEventListener("keydown", (e) => {
    e.stopPropagation();                 // keys typed here are text, not notebook shortcuts
    if (e.key !== "Enter" || e.isComposing) return;   // (Enter that ends an IME composition)
    e.preventDefault();
    const text = input.value.trim();
    if (!text || model.get("disabled")) return;
    const key = model.get("key");
    edit("add", text);
    typed += 1;
    pending.push({ n: typed, key, text });
    input.value = "";                    // ready for the next one at once
  });

  // keys are JSON texts such as '["neuron", 3]'; compared by value all the same, should one
  // ever arrive as a list
  const sameKey = (a, b) => JSON.stringify(a) === JSON.stringify(b);
  const answered = (msg) => {
    if (!msg || msg.op !== "answer") return;
    // only an answer to an add of this view: the same model shown twice gets it in both
    const i = pending.findIndex((p) => sameKey(p.key, msg.key) && p.text === msg.text);
    if (i < 0) return;
    const [sent] = pending.splice(i, 1);
    if (!msg.taken && (held === null || sent.n > held.n)) held = sent;
    // The input holds one text: of the refused adds, the one typed last comes back, once no
    // add typed after it awaits its answer (that one may be refused too); an earlier refused
    // one is dropped then (the kernel's message says what was refused).
    if (held === null || pending.some((p) => p.n > held.n)) return;
    const back = held;
    held = null;
    // Not into the row of another key (a click elsewhere reached the kernel first), and never
    // over what the person has typed since: an input that holds another text is left as it is.
    if (!sameKey(back.key, model.get("key"))) return;
    if (input.value && input.value !== back.text) return;
    input.value = back.text;
  };
  model.on("msg:custom", answered);

  const traits = ["value", "key", "disabled", "placeholder"];
  traits.forEach((t) => model.on(`change:${t}`, draw));
  draw();

  return () => {
    unwatch();
    traits.forEach((t) => model.off(`change:${t}`, draw));
    model.off("msg:custom", answered);
  };
}

export default { render };
