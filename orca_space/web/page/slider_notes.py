"""A number typed past a slider's range says so where it happens.

gradio's slider puts a typed number back into its range when the box loses focus, without a
word: 5000 in Max new tokens became the most the context allows, 7 in Temperature became 2.
In the browser, just before gradio does that, a line under the slider says what became of the
number typed; it goes when the number is typed again.
"""

from __future__ import annotations

SLIDER_NOTES_CSS = """
.clamped-note { font-size: var(--text-sm); color: var(--body-text-color-subdued); margin-top: var(--size-1); }
"""

SLIDER_NOTES_HEAD = """
<script>
(() => {
  const PREFIX = "number input for ";
  const format = (n) => Number(n).toLocaleString("en-US", {maximumFractionDigits: 6});
  const noteFor = (input) => {
    const block = input.closest(".block");
    if (!block) return null;
    let note = block.querySelector(":scope > .clamped-note");
    if (!note) {
      note = Object.assign(document.createElement("p"), {className: "clamped-note"});
      note.setAttribute("role", "status");
      block.appendChild(note);
    }
    return note;
  };
  const isSliderNumber = (element) =>
    element instanceof HTMLInputElement && element.type === "number"
    && (element.getAttribute("aria-label") ?? "").startsWith(PREFIX);
  // Capture, before gradio's own blur handler puts the number back into the range.
  document.addEventListener("blur", (event) => {
    const input = event.target;
    if (!isSliderNumber(input) || input.value === "") return;
    const typed = Number(input.value), low = Number(input.min), high = Number(input.max);
    if (Number.isNaN(typed) || (typed >= low && typed <= high)) return;
    const name = input.getAttribute("aria-label").slice(PREFIX.length);
    const bound = typed > high ? high : low;
    const side = typed > high ? "the most" : "the least";
    const note = noteFor(input);
    if (note) note.textContent = `${format(typed)} is outside ${name}'s range: set to ${side}, ${format(bound)}.`;
  }, true);
  document.addEventListener("input", (event) => {
    if (!isSliderNumber(event.target)) return;
    event.target.closest(".block")?.querySelector(":scope > .clamped-note")?.remove();
  }, true);
})();
</script>
"""
