/* A small Markdown renderer for model answers and report.md files.
 *
 * window.LmMarkdown.render(text, options) -> DocumentFragment
 *
 * It builds DOM nodes with createElement and text nodes only and never parses HTML, so whatever
 * the text holds (<script>, <img onerror>, entities) stays visible text. Links and images are
 * kept only when the browser's own URL parser resolves them to http(s): `javascript:` and other
 * schemes are shown as the Markdown source. Half-written input (a streaming answer) renders as
 * far as it goes; an unclosed code fence is a code block up to the end.
 *
 * Options (all optional):
 *   breaks  - a single newline inside a paragraph is a line break (chat style); default false,
 *             as in CommonMark, where only two trailing spaces or a backslash break a line.
 *   images  - render ![alt](src) as <img>; by default it becomes a link to src, so a model
 *             cannot make the page fetch an address just by writing it.
 *   resolve - function(url) -> url for relative links and images (e.g. a run's file route).
 *
 * Supported: ATX headings, paragraphs, *em*, **strong**, ~~strike~~, `code`, fenced code blocks
 * (<pre data-lang><code class="language-x">), bullet and numbered lists (nested by indentation),
 * blockquotes, GitHub pipe tables, [links](url), <autolinks> and bare http(s) URLs, horizontal
 * rules and line breaks.
 */
(function () {
  "use strict";

  const FENCE = /^ {0,3}(`{3,}(?=[^`]*$)|~{3,})\s*([^\s`]*)/;
  const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
  const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  const QUOTE = /^ {0,3}> ?(.*)$/;
  const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])(?:[ \t]+(.*)|$)/;
  const TABLE_RULE = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;
  const PUNCTUATION = /[!-/:-@[-`{-~]/;
  const BARE_URL = /^https?:\/\/[^\s<>"]*[^\s<>".,;:!?')\]*_~]/;
  const SCHEME = /^[a-z][a-z0-9+.-]*:|^\/\//i;

  function el(tag, className) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    return node;
  }

  function indentOf(line) {
    return line.length - line.trimStart().length;
  }

  // A line that ends a paragraph because it starts a block of its own.
  function startsBlock(line) {
    return (
      FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
      ITEM.test(line)
    );
  }

  function splitRow(line) {
    let s = line.trim();
    if (s.startsWith("|")) s = s.slice(1);
    if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
    const cells = [];
    let cell = "";
    for (let i = 0; i < s.length; i++) {
      if (s[i] === "\\" && s[i + 1] === "|") {
        cell += "|";
        i++;
      } else if (s[i] === "|") {
        cells.push(cell.trim());
        cell = "";
      } else {
        cell += s[i];
      }
    }
    cells.push(cell.trim());
    return cells;
  }

  function isTableStart(lines, i) {
    return (
      i + 1 < lines.length && lines[i].includes("|") && lines[i + 1].includes("|") &&
      TABLE_RULE.test(lines[i + 1]) && splitRow(lines[i]).length === splitRow(lines[i + 1]).length
    );
  }

  // --- Blocks ------------------------------------------------------------------------------

  function renderBlocks(lines, parent, opts) {
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) {
        i++;
      } else if ((m = FENCE.exec(line))) {
        i = codeBlock(lines, i, m, parent);
      } else if ((m = HEADING.exec(line))) {
        const h = el("h" + m[1].length);
        renderInline(m[2] || "", h, opts);
        parent.appendChild(h);
        i++;
      } else if (RULE.test(line)) {
        parent.appendChild(el("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        i = blockquote(lines, i, parent, opts);
      } else if (ITEM.test(line)) {
        i = list(lines, i, parent, opts);
      } else if (isTableStart(lines, i)) {
        i = table(lines, i, parent, opts);
      } else {
        i = paragraph(lines, i, parent, opts);
      }
    }
  }

  function codeBlock(lines, start, m, parent) {
    const fence = m[1];
    const close = new RegExp("^ {0,3}" + (fence[0] === "`" ? "`" : "~") + "{" + fence.length +
      ",}[ \\t]*$");
    const body = [];
    let i = start + 1;
    while (i < lines.length && !close.test(lines[i])) body.push(lines[i++]);
    const pre = el("pre");
    const code = el("code");
    const lang = m[2].replace(/[^\w+#.-]/g, "");
    if (lang) {
      code.className = "language-" + lang;
      pre.dataset.lang = lang;
    }
    code.textContent = body.join("\n");
    pre.appendChild(code);
    parent.appendChild(pre);
    return i + 1; // past the closing fence, or past the end when it is still missing
  }

  function blockquote(lines, start, parent, opts) {
    const body = [];
    let i = start;
    while (i < lines.length) {
      const m = QUOTE.exec(lines[i]);
      if (m) body.push(m[1]);
      else if (lines[i].trim() && !startsBlock(lines[i])) body.push(lines[i]); // lazy line
      else break;
      i++;
    }
    const quote = el("blockquote");
    renderBlocks(body, quote, opts);
    parent.appendChild(quote);
    return i;
  }

  function list(lines, start, parent, opts) {
    const first = ITEM.exec(lines[start]);
    const ordered = /\d/.test(first[2]);
    const node = el(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
    const items = [];
    let loose = false;
    let i = start;
    let m;
    while (i < lines.length && (m = ITEM.exec(lines[i])) && /\d/.test(m[2]) === ordered) {
      const base = m[1].length;
      const offset = base + m[2].length + 1;
      const body = [m[3] || ""];
      let blank = false;
      i++;
      while (i < lines.length) {
        const line = lines[i];
        const lead = indentOf(line);
        if (!line.trim()) {
          body.push("");
          blank = true;
        } else if (lead >= base + 2) {
          // Indented past the marker: a continuation or a nested block of this item.
          if (blank) loose = loose || !ITEM.test(line.slice(Math.min(lead, offset)));
          body.push(line.slice(Math.min(lead, offset)));
          blank = false;
        } else if (!blank && !startsBlock(line) && !isTableStart(lines, i)) {
          body.push(line.trim()); // a lazy continuation of the item's paragraph
        } else {
          break;
        }
        i++;
      }
      while (body.length && !body[body.length - 1].trim()) body.pop();
      items.push(body);
      const next = i < lines.length && ITEM.exec(lines[i]);
      if (blank && next && /\d/.test(next[2]) === ordered) loose = true;
    }
    for (const body of items) {
      const li = el("li");
      renderBlocks(body, li, opts);
      if (!loose) {
        // A tight list shows its items' text directly, not as separate paragraphs.
        for (const p of Array.from(li.children)) {
          if (p.tagName === "P") p.replaceWith(...p.childNodes);
        }
      }
      node.appendChild(li);
    }
    parent.appendChild(node);
    return i;
  }

  function table(lines, start, parent, opts) {
    const header = splitRow(lines[start]);
    const align = splitRow(lines[start + 1]).map((c) => {
      const left = c.startsWith(":");
      const right = c.endsWith(":");
      return left && right ? "center" : right ? "right" : left ? "left" : "";
    });
    const tableEl = el("table");
    const head = el("thead");
    head.appendChild(row(header, "th", align, opts));
    tableEl.appendChild(head);
    const body = el("tbody");
    let i = start + 2;
    while (i < lines.length && lines[i].trim() && lines[i].includes("|") && !startsBlock(lines[i])) {
      const cells = splitRow(lines[i]);
      const fitted = header.map((_, k) => cells[k] || "");
      body.appendChild(row(fitted, "td", align, opts));
      i++;
    }
    if (body.children.length) tableEl.appendChild(body);
    // Wide tables scroll inside their box instead of widening the page.
    const wrap = el("div", "md-table");
    wrap.style.overflowX = "auto";
    wrap.style.maxWidth = "100%";
    wrap.appendChild(tableEl);
    parent.appendChild(wrap);
    return i;
  }

  function row(cells, tag, align, opts) {
    const tr = el("tr");
    cells.forEach((text, k) => {
      const cell = el(tag);
      if (align[k]) cell.style.textAlign = align[k];
      renderInline(text, cell, opts);
      tr.appendChild(cell);
    });
    return tr;
  }

  function paragraph(lines, start, parent, opts) {
    const body = [lines[start]];
    let i = start + 1;
    while (
      i < lines.length && lines[i].trim() && !startsBlock(lines[i]) && !isTableStart(lines, i)
    ) {
      body.push(lines[i++]);
    }
    const p = el("p");
    renderInline(body.map((l) => l.trimStart()).join("\n"), p, opts);
    parent.appendChild(p);
    return i;
  }

  // --- Inline ------------------------------------------------------------------------------

  // The browser's URL parser decides what a link would open (it drops tabs and newlines, so
  // "java\tscript:" is javascript:); only http(s) survives.
  function safeUrl(raw, opts) {
    let url = raw.trim();
    if (!url) return null;
    if (opts.resolve && !SCHEME.test(url)) url = opts.resolve(url);
    try {
      const parsed = new URL(url, document.baseURI);
      return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
    } catch (e) {
      return null;
    }
  }

  function makeLink(href) {
    const a = el("a");
    a.href = href;
    if (new URL(href).origin !== location.origin) {
      a.target = "_blank";
      a.rel = "noopener noreferrer";
    }
    return a;
  }

  // [text](destination "title") starting at text[i] === "[": {label, url, end} or null.
  function parseLink(text, i) {
    let depth = 0;
    let j = i;
    for (; j < text.length; j++) {
      const c = text[j];
      if (c === "\\") j++;
      else if (c === "[") depth++;
      else if (c === "]" && --depth === 0) break;
    }
    if (j >= text.length || text[j + 1] !== "(") return null;
    const label = text.slice(i + 1, j);
    let k = j + 2;
    while (text[k] === " ") k++;
    let url = "";
    if (text[k] === "<") {
      const close = text.indexOf(">", k);
      if (close < 0) return null;
      url = text.slice(k + 1, close);
      k = close + 1;
    } else {
      let parens = 0;
      for (; k < text.length; k++) {
        const c = text[k];
        if (c === "\\" && PUNCTUATION.test(text[k + 1] || "")) {
          url += text[++k];
          continue;
        }
        if (/\s/.test(c) || (c === ")" && parens === 0)) break;
        if (c === "(") parens++;
        if (c === ")") parens--;
        url += c;
      }
    }
    const title = /^\s+("[^"]*"|'[^']*'|\([^)]*\))/.exec(text.slice(k));
    if (title) k += title[0].length;
    while (text[k] === " ") k++;
    if (text[k] !== ")") return null;
    return { label, url, end: k + 1 };
  }

  // The end of the emphasis that opens with `delim` at text[i], or -1: the opener must touch
  // a word on its right and the closer one on its left; "_" only counts between words.
  function closingDelimiter(text, i, delim) {
    const start = i + delim.length;
    const ch = delim[0];
    if (!text[start] || /\s/.test(text[start])) return -1;
    if (ch === "_" && /[\p{L}\p{N}]/u.test(text[i - 1] || "")) return -1;
    for (let k = text.indexOf(delim, start + 1); k >= 0; k = text.indexOf(delim, k + 1)) {
      if (/\s/.test(text[k - 1])) continue;
      if (delim.length === 1 && (text[k + 1] === ch || text[k - 1] === ch)) continue;
      if (ch === "_" && /[\p{L}\p{N}]/u.test(text[k + delim.length] || "")) continue;
      return k;
    }
    return -1;
  }

  const TAGS = { "*": "em", "_": "em", "**": "strong", "__": "strong", "~~": "del" };

  function renderInline(text, parent, opts) {
    let buf = "";
    const flush = () => {
      if (buf) parent.appendChild(document.createTextNode(buf));
      buf = "";
    };
    const emit = (node) => {
      flush();
      parent.appendChild(node);
    };
    let i = 0;
    while (i < text.length) {
      const c = text[i];
      if (c === "\\" && text[i + 1] === "\n") {
        emit(el("br"));
        i += 2;
      } else if (c === "\\" && PUNCTUATION.test(text[i + 1] || "")) {
        buf += text[i + 1];
        i += 2;
      } else if (c === "\n") {
        const hard = opts.breaks || / {2,}$/.test(buf);
        buf = buf.replace(/ +$/, "");
        if (hard) emit(el("br"));
        else buf += "\n";
        i++;
      } else if (c === "`") {
        const run = /^`+/.exec(text.slice(i))[0];
        const close = findCodeClose(text, i + run.length, run.length);
        if (close < 0) {
          buf += run;
          i += run.length;
          continue;
        }
        let content = text.slice(i + run.length, close).replace(/\n/g, " ");
        if (/^ .*[^ ].* $/.test(content)) content = content.slice(1, -1);
        const code = el("code");
        code.textContent = content;
        emit(code);
        i = close + run.length;
      } else if (!opts.inLink && (c === "[" || (c === "!" && text[i + 1] === "["))) {
        const image = c === "!";
        const link = parseLink(text, image ? i + 1 : i);
        const href = link && safeUrl(link.url, opts);
        if (!link) {
          buf += c;
          i++;
          continue;
        }
        if (!href) {
          buf += text.slice(i, link.end); // unsafe target: show what was written
        } else if (image && opts.images) {
          const img = el("img");
          img.src = href;
          img.alt = link.label;
          emit(img);
        } else {
          const a = makeLink(href);
          if (image) a.className = "md-image-link";
          renderInline(link.label || link.url, a, { ...opts, inLink: true });
          emit(a);
        }
        i = link.end;
      } else if (!opts.inLink && c === "<" && /^<https?:\/\/[^\s<>]+>/i.test(text.slice(i))) {
        const raw = /^<([^>]+)>/.exec(text.slice(i))[1];
        const href = safeUrl(raw, opts);
        if (href) {
          const a = makeLink(href);
          a.textContent = raw;
          emit(a);
        } else {
          buf += "<" + raw + ">";
        }
        i += raw.length + 2;
      } else if (c === "h" && !opts.inLink && bareUrlAt(text, i)) {
        const raw = bareUrlAt(text, i);
        const href = safeUrl(raw, opts);
        if (href) {
          const a = makeLink(href);
          a.textContent = raw;
          emit(a);
        } else {
          buf += raw;
        }
        i += raw.length;
      } else if (c === "*" || c === "_" || c === "~") {
        const run = /^(\*+|_+|~+)/.exec(text.slice(i))[0];
        let done = false;
        for (const delim of [run.slice(0, 2), run.slice(0, 1)]) {
          if (!TAGS[delim]) continue;
          const close = closingDelimiter(text, i, delim);
          if (close < 0) continue;
          const node = el(TAGS[delim]);
          renderInline(text.slice(i + delim.length, close), node, opts);
          emit(node);
          i = close + delim.length;
          done = true;
          break;
        }
        if (!done) {
          buf += run;
          i += run.length;
        }
      } else {
        buf += c;
        i++;
      }
    }
    flush();
  }

  function bareUrlAt(text, i) {
    if (/[\p{L}\p{N}]/u.test(text[i - 1] || "")) return null;
    const m = BARE_URL.exec(text.slice(i, i + 2048));
    return m && m[0];
  }

  function findCodeClose(text, from, length) {
    const re = /`+/g;
    re.lastIndex = from;
    let m;
    while ((m = re.exec(text))) if (m[0].length === length) return m.index;
    return -1;
  }

  function render(text, options) {
    const opts = options || {};
    const fragment = document.createDocumentFragment();
    renderBlocks(String(text || "").replace(/\r\n?/g, "\n").split("\n"), fragment, opts);
    return fragment;
  }

  window.LmMarkdown = { render };
})();
