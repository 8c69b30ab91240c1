// The heatmap's hover tooltip (anywidget; multiviz_widgets/views/heatmap_view.py, CellTip).
// bqplot shows a mark's tooltip at once on hover and only then sends the hover to the kernel, so
// a tooltip that the kernel writes would still hold the previous cell's text for a round trip
// (for ever with no kernel). This one knows the cell under the pointer (bqplot's datum of the
// hovered rect.heatmapcell: rowNum, columnNum), read before bqplot shows the tooltip, and shows
// the kernel's text only when it is that cell's; meanwhile an ellipsis. Text only (textContent).
function render({ model, el }) {
  const box = document.createElement("div");
  box.className = "mvz-cell-tip";
  box.style.whiteSpace = "pre";
  el.appendChild(box);
  let hovered = null;                   // [rowNum, columnNum] of the cell under the pointer
  const paint = () => {
    const tip = model.get("tip") || {};
    const mine = hovered !== null && tip.row === hovered[0] && tip.col === hovered[1];
    box.textContent = mine ? String(tip.text || "") : "\u2026";
    box.dataset.cell = hovered === null ? "" : hovered.join(",");
    box.dataset.current = mine ? "true" : "false";
  };
  const over = (ev) => {                // capture: before bqplot shows the tooltip
    const t = ev.target;
    if (!(t instanceof Element) || !t.matches("rect.heatmapcell") || !t.__data__) return;
    hovered = [Number(t.__data__.rowNum), Number(t.__data__.columnNum)];
    paint();
  };
  document.addEventListener("mouseover", over, true);
  model.on("change:tip", paint);
  paint();
  return () => {
    document.removeEventListener("mouseover", over, true);
    model.off("change:tip", paint);
  };
}
export default { render };
