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
 *
 * The text may be hostile (a model's answer, a run's report), so rendering takes time about
 * linear in its length, quotes and lists nest at most MAX_DEPTH deep, and render() never throws:
 * should anything still fail, it returns the text as written.
 */
(function () {
  "use strict";

  const FENCE = /^ {0,3}(`{3,}(?=[^`]*$)|~{3,})\s*([^\s`]*)/;
  const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*))?$/; // the closing #s: headingText
  const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  const QUOTE = /^ {0,3}> ?(.*)$/;
  const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])(?:[ \t]+(.*)|$)/;
  // No two [ \t]* side by side: the regex engine would try every split of a long run of blanks.
  const TABLE_RULE = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*(?:\|[ \t]*)?$/;
  const PUNCTUATION = /[!-/:-@[-`{-~]/;
  const BARE_URL = /^https?:\/\/[^\s<>"]*[^\s<>".,;:!?')\]*_~]/;
  const SCHEME = /^[a-z][a-z0-9+.-]*:|^\/\//i;
  // Quotes and lists nest at most this deep; deeper content is shown as plain text. Each level
  // is a recursive call, so 10 KB of "> > > …" overflowed the stack without a limit.
  const MAX_DEPTH = 32;

  function el(tag, className) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    return node;
  }

  function indentOf(line) {
    return line.length - line.trimStart().length;
  }

  // `s` less the characters of `chars` at its end, counted from the end: a regex such as / +$/
  // starts again at each character of a long run that is not at the end, in quadratic time.
  function trimEndOf(s, chars) {
    let end = s.length;
    while (end > 0 && chars.includes(s[end - 1])) end--;
    return s.slice(0, end);
  }

  // A heading's text less its closing sequence: #s after a space or tab, and blanks around.
  function headingText(raw) {
    const text = trimEndOf(raw || "", " \t");
    const bare = trimEndOf(text, "#");
    return bare !== text && (bare.endsWith(" ") || bare.endsWith("\t"))
      ? trimEndOf(bare, " \t")
      : text;
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

  // `depth`: how many quotes and list items hold these lines.
  function renderBlocks(lines, parent, opts, depth) {
    if (depth >= MAX_DEPTH) {
      const p = el("p");
      p.textContent = lines.join("\n");
      parent.appendChild(p);
      return;
    }
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
        renderInline(headingText(m[2]), h, opts);
        parent.appendChild(h);
        i++;
      } else if (RULE.test(line)) {
        parent.appendChild(el("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        i = blockquote(lines, i, parent, opts, depth);
      } else if (ITEM.test(line)) {
        i = list(lines, i, parent, opts, depth);
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

  function blockquote(lines, start, parent, opts, depth) {
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
    renderBlocks(body, quote, opts, depth + 1);
    parent.appendChild(quote);
    return i;
  }

  function list(lines, start, parent, opts, depth) {
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
      renderBlocks(body, li, opts, depth + 1);
      if (!loose) {
        // A tight list shows its items' text directly, not as separate paragraphs. The nodes
        // move one by one: spread as arguments, those of a long item overflow the stack.
        for (const p of Array.from(li.children)) {
          if (p.tagName !== "P") continue;
          while (p.firstChild) p.before(p.firstChild);
          p.remove();
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

  // What the inline parser looks ahead for in one text (where emphasis, code spans, link labels
  // and destinations close), each kind found in one pass over the text when first needed.
  // Searching on from every opener instead took time quadratic in the openers that never close:
  // "*a " or "[x](" written 20,000 times took seconds, and the chat renders a streaming answer
  // again on every frame.
  class Lookahead {
    constructor(text) {
      this.text = text;
      this.found = new Map();
    }

    memo(key, build) {
      if (!this.found.has(key)) this.found.set(key, build(this.text));
      return this.found.get(key);
    }

    // The first place at or after `from` where `delim` closes emphasis, or -1.
    emphasisClose(delim, from) {
      return firstFrom(this.memo(delim, (text) => emphasisCloses(text, delim)), from);
    }

    // The first run of exactly `length` backticks at or after `from`, or -1.
    codeClose(length, from) {
      return firstFrom(this.memo("`", backtickRuns).get(length) || [], from);
    }

    // The "]" that closes the "[" at `i`, or -1.
    bracketClose(i) {
      return this.memo("[", bracketPairs)[i];
    }

    // Where a link destination that starts at `i` ends.
    destinationEnd(i) {
      return this.memo("(", destinationEnds)[i];
    }

    // The first index at or after `from` whose character matches `re`, or the text's length.
    next(re, from) {
      return this.memo(re, (text) => nextMatches(text, re))[Math.min(from, this.text.length)];
    }
  }

  // The first of the ascending `positions` that is at least `from`, or -1.
  function firstFrom(positions, from) {
    let lo = 0;
    let hi = positions.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (positions[mid] < from) lo = mid + 1;
      else hi = mid;
    }
    return lo < positions.length ? positions[lo] : -1;
  }

  // Where `delim` can close emphasis: right after a non-blank, and "_" not before a letter or
  // digit; a single "*" or "_" must not touch another one.
  function emphasisCloses(text, delim) {
    const ch = delim[0];
    const found = [];
    for (let k = text.indexOf(delim); k >= 0; k = text.indexOf(delim, k + 1)) {
      if (/\s/.test(text[k - 1] || "")) continue;
      if (delim.length === 1 && (text[k + 1] === ch || text[k - 1] === ch)) continue;
      if (ch === "_" && /[\p{L}\p{N}]/u.test(text[k + delim.length] || "")) continue;
      found.push(k);
    }
    return found;
  }

  // Runs of backticks: length -> where the runs of that length start, ascending.
  function backtickRuns(text) {
    const runs = new Map();
    for (const m of text.matchAll(/`+/g)) {
      if (!runs.has(m[0].length)) runs.set(m[0].length, []);
      runs.get(m[0].length).push(m.index);
    }
    return runs;
  }

  // For each "[", the "]" that closes it (brackets nest, "\" escapes any character), or -1.
  function bracketPairs(text) {
    const close = new Int32Array(text.length).fill(-1);
    const open = [];
    for (let p = 0; p < text.length; p++) {
      if (text[p] === "\\") p++;
      else if (text[p] === "[") open.push(p);
      else if (text[p] === "]" && open.length) close[open.pop()] = p;
    }
    return close;
  }

  // For each start, where a link destination would end: at whitespace or at a ")" that no "("
  // after the start opened ("\" escapes punctuation). Filled from the end, each entry from one
  // further on: past a "(", from the place after its matching ")".
  function destinationEnds(text) {
    const n = text.length;
    const match = new Int32Array(n).fill(-1);
    const open = [];
    for (let p = 0; p < n; p++) {
      if (text[p] === "\\" && PUNCTUATION.test(text[p + 1] || "")) p++;
      else if (text[p] === "(") open.push(p);
      else if (text[p] === ")" && open.length) match[open.pop()] = p;
    }
    const ends = new Int32Array(n + 1);
    ends[n] = n;
    let blank = n; // the first whitespace at or after p
    for (let p = n - 1; p >= 0; p--) {
      const c = text[p];
      if (/\s/.test(c)) blank = p;
      if (blank === p || c === ")") ends[p] = p;
      else if (c === "\\" && PUNCTUATION.test(text[p + 1] || "")) ends[p] = ends[p + 2];
      else if (c === "(") ends[p] = match[p] < 0 || blank < match[p] ? blank : ends[match[p] + 1];
      else ends[p] = ends[p + 1];
    }
    return ends;
  }

  // For each index, the first index at or after it whose character matches `re`, else the
  // text's length.
  function nextMatches(text, re) {
    const next = new Int32Array(text.length + 1);
    next[text.length] = text.length;
    for (let p = text.length - 1; p >= 0; p--) next[p] = re.test(text[p]) ? p : next[p + 1];
    return next;
  }

  const ESCAPE = /\\([!-/:-@[-`{-~])/g;
  const NOT_BLANK = /\S/;
  const NOT_SPACE = /[^ ]/;
  const ANGLE_CLOSE = />/;
  const TITLE_CLOSE = { '"': /"/, "'": /'/, "(": /\)/ };

  // [text](destination "title") starting at text[i] === "[": {label, url, end} or null.
  function parseLink(text, i, look) {
    const j = look.bracketClose(i);
    if (j < 0 || text[j + 1] !== "(") return null;
    let k = j + 2;
    while (text[k] === " ") k++;
    const angled = text[k] === "<";
    const from = angled ? k + 1 : k;
    const to = angled ? look.next(ANGLE_CLOSE, k) : look.destinationEnd(k);
    if (angled && to === text.length) return null;
    k = angled ? to + 1 : to;
    const open = look.next(NOT_BLANK, k);
    if (open > k && TITLE_CLOSE[text[open]]) {
      const close = look.next(TITLE_CLOSE[text[open]], open + 1);
      if (close < text.length) k = close + 1;
    }
    k = look.next(NOT_SPACE, k);
    if (text[k] !== ")") return null;
    // Built only now: a destination can reach to the end of the text, which is no cost to pay
    // for each of many "[" that turn out not to be links.
    const url = angled ? text.slice(from, to) : text.slice(from, to).replace(ESCAPE, "$1");
    return { label: text.slice(i + 1, j), url, end: k + 1 };
  }

  // The end of the emphasis that opens with `delim` at text[i], or -1: the opener must touch
  // a word on its right and the closer one on its left; "_" only counts between words.
  function closingDelimiter(text, i, delim, look) {
    const start = i + delim.length;
    if (!text[start] || /\s/.test(text[start])) return -1;
    if (delim[0] === "_" && /[\p{L}\p{N}]/u.test(text[i - 1] || "")) return -1;
    return look.emphasisClose(delim, start + 1);
  }

  const TAGS = { "*": "em", "_": "em", "**": "strong", "__": "strong", "~~": "del" };

  function renderInline(text, parent, opts) {
    const look = new Lookahead(text);
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
        const kept = trimEndOf(buf, " ");
        const hard = opts.breaks || buf.length - kept.length >= 2;
        buf = hard ? kept : kept + "\n";
        // Either way the line leaves the buffer, so that looking for trailing spaces reads only
        // the current line (reading the paragraph so far at each newline was quadratic).
        if (hard) emit(el("br"));
        else flush();
        i++;
      } else if (c === "`") {
        const run = /^`+/.exec(text.slice(i))[0];
        const close = look.codeClose(run.length, i + run.length);
        if (close < 0) {
          buf += run;
          i += run.length;
          continue;
        }
        let content = text.slice(i + run.length, close).replace(/\n/g, " ");
        // One space comes off each end when there is more than spaces (tested without a
        // regex like /^ .*[^ ].* $/, which is quadratic in the content's length).
        if (content.startsWith(" ") && content.endsWith(" ") && /[^ ]/.test(content)) {
          content = content.slice(1, -1);
        }
        const code = el("code");
        code.textContent = content;
        emit(code);
        i = close + run.length;
      } else if (!opts.inLink && (c === "[" || (c === "!" && text[i + 1] === "["))) {
        const image = c === "!";
        const link = parseLink(text, image ? i + 1 : i, look);
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
          const close = closingDelimiter(text, i, delim, look);
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

  function render(text, options) {
    const source = String(text || "").replace(/\r\n?/g, "\n");
    try {
      const fragment = document.createDocumentFragment();
      renderBlocks(source.split("\n"), fragment, options || {}, 0);
      return fragment;
    } catch (e) {
      // Whatever still fails (a case the limits above miss, a `resolve` that throws) costs the
      // formatting of this text, not the caller's page: the chat and the runs browser render
      // as part of drawing themselves, and an exception there left them broken.
      const fragment = document.createDocumentFragment();
      fragment.appendChild(document.createTextNode(source));
      return fragment;
    }
  }

  window.LmMarkdown = { render };
})();
