// The heatmap's hover tooltip (anywidget; multiviz_widgets/views/heatmap_view.py, CellTip).
// bqplot shows a mark's tooltip at once on hover and only then sends the hover to the kernel, so
// a tooltip that the kernel writes would still hold the previous cell's text for a round trip
// (for ever with no kernel). This one knows the cell under the pointer (bqplot's datum of the
// hovered rect.heatmapcell: rowNum, columnNum), read before bqplot shows the tooltip, and shows
// the kernel's text only when it is that cell's; meanwhile an ellipsis. Text only (textContent).
// bqplot never calls this view's remove() (a mark's or a figure's remove() drops the tooltip's
// element, not its view), so anywidget's clean-up would never run after "clear outputs" or a
// re-run: the document listener and the model's handler would stay, one more each time. So
// each of them, once the element is out of the page for good, removes both itself: the
// element is out of the page and either was in it or was put into a container (bqplot puts it
// into the mark's tooltip box, within the figure's, which is in document.body; the figure's
// remove() takes its box out of the page, with the element still in it). The element is
// rendered before bqplot puts it anywhere (no parent yet): that is not being gone. Being in
// document.body, away from the notebook's cells, it is not taken out of the page while its
// cell is scrolled away.
function render({ model, el }) {
  const box = document.createElement("div");
  box.className = "mvz-cell-tip";
  box.style.whiteSpace = "pre";
  el.appendChild(box);
  let hovered = null;                   // [rowNum, columnNum] of the cell under the pointer
  let shown = false;                    // whether the element has been seen in the page
  let detach = () => {};
  const gone = () => {                  // out of the page for good: let go of it
    if (el.isConnected) shown = true;
    if (el.isConnected || !(shown || el.parentNode)) return false;
    detach();
    return true;
  };
  const paint = () => {
    if (gone()) return;
    const tip = model.get("tip") || {};
    const mine = hovered !== null && tip.row === hovered[0] && tip.col === hovered[1];
    box.textContent = mine ? String(tip.text || "") : "\u2026";
    box.dataset.cell = hovered === null ? "" : hovered.join(",");
    box.dataset.current = mine ? "true" : "false";
  };
  const over = (ev) => {                // capture: before bqplot shows the tooltip
    if (gone()) return;
    const t = ev.target;
    if (!(t instanceof Element) || !t.matches("rect.heatmapcell") || !t.__data__) return;
    hovered = [Number(t.__data__.rowNum), Number(t.__data__.columnNum)];
    paint();
  };
  detach = () => {
    document.removeEventListener("mouseover", over, true);
    model.off("change:tip", paint);
  };
  document.addEventListener("mouseover", over, true);
  model.on("change:tip", paint);
  paint();
  return detach;                        // anywidget's clean-up, should remove() ever be called
}
export default { render };
