/* The chat page of `lmforge serve --ui`, talking to the server's own OpenAI-compatible API.
 *
 * The conversation is a plain array of {role, content, state, ...} objects; the page is redrawn
 * from it (whole on structural changes, one message per animation frame while streaming).
 * Model text reaches the DOM only as text nodes or through LmMarkdown, which never parses HTML,
 * and the server's Content-Security-Policy forbids inline script besides.
 */
(function () {
  "use strict";

  const STORE = "lmforge-chat"; // localStorage: settings and, if kept, the conversation
  const KEY_STORE = "lmforge-api-key"; // sessionStorage: the API key lives as long as the tab
  const TOOL_TAGS = { calculator: "calc", retrieval: "search" }; // the call syntax, tools.py
  const TOOL_NAMES = { calc: "calculator", search: "retrieval" };
  const LOST =
    "The connection to the server was lost; the answer above is incomplete. " +
    "Send again once the server is back.";
  const UNREACHABLE =
    "Cannot reach the server: the connection was lost. Send again once the server is back.";
  // Settings fields by element id, and the property that holds each one's value.
  const FIELDS = {
    system: "value",
    temperature: "value",
    "top-p": "value",
    "max-tokens": "value",
    "self-consistency": "value",
    cot: "value",
    "tool-calculator": "checked",
    "tool-retrieval": "checked",
    keep: "checked",
  };

  const $ = (id) => document.getElementById(id);
  const ui = {
    messages: $("messages"),
    empty: $("empty"),
    input: $("input"),
    send: $("send"),
    stop: $("stop"),
    status: $("status"),
    model: $("model"),
    auth: $("auth"),
    apiKey: $("api-key"),
    settings: $("settings"),
    settingsToggle: $("settings-toggle"),
  };

  const state = {
    model: null, // the served model id, from /v1/models; cleared when the connection breaks
    messages: [],
    busy: null, // {controller} while a request runs
  };
  const views = new WeakMap(); // message -> its element on the page
  let frame = 0; // a requested animation frame that redraws the streaming message

  // An error to show: kind "connection" (the server is unreachable or went away), "auth"
  // (401) or "api" (the server answered with an error).
  class ChatError extends Error {
    constructor(message, kind) {
      super(message);
      this.kind = kind;
    }
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function button(label, testid, onClick) {
    const b = el("button", "small-button", label);
    b.type = "button";
    b.dataset.testid = testid;
    b.addEventListener("click", onClick);
    return b;
  }

  function setStatus(text, isError) {
    ui.status.textContent = text;
    ui.status.classList.toggle("error", Boolean(isError));
    ui.status.classList.toggle("muted", !isError);
  }

  // --- Settings and storage -------------------------------------------------------------

  function readSettings() {
    const s = {};
    for (const [id, prop] of Object.entries(FIELDS)) s[id] = $(id)[prop];
    return s;
  }

  function applySettings(s) {
    for (const [id, prop] of Object.entries(FIELDS)) {
      if (s && typeof s[id] === typeof $(id)[prop]) $(id)[prop] = s[id];
    }
  }

  function save() {
    const settings = readSettings();
    const data = { settings, messages: settings.keep ? state.messages : [] };
    try {
      localStorage.setItem(STORE, JSON.stringify(data));
    } catch (e) {
      // Storage full or disabled (private windows): the page works without it.
    }
  }

  function load() {
    let data = null;
    try {
      data = JSON.parse(localStorage.getItem(STORE) || "null");
    } catch (e) {
      data = null; // unreadable: start afresh
    }
    if (!data || typeof data !== "object") return;
    applySettings(data.settings);
    if (!Array.isArray(data.messages)) return;
    state.messages = data.messages
      .filter((m) => m && (m.role === "user" || m.role === "assistant"))
      .filter((m) => typeof m.content === "string")
      // A page closed mid-answer left it half written.
      .map((m) => (m.state === "streaming" ? { ...m, state: "stopped" } : m));
  }

  // --- The API --------------------------------------------------------------------------

  function api(path, init) {
    const headers = {};
    if (init && init.body) headers["Content-Type"] = "application/json";
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) headers.Authorization = "Bearer " + key;
    // Relative paths, so the page also works behind a proxy that mounts it under a prefix.
    return fetch(path, { ...init, headers });
  }

  // The message of an API error: OpenAI's {"error": {"message": …}}, or a bare string
  // {"error": "…"}, as some servers and proxies send it.
  function errorMessage(error) {
    return typeof error === "string" ? error : error && error.message;
  }

  async function apiError(response) {
    let message = `HTTP ${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      const text = body && errorMessage(body.error);
      if (text) message = `${text} (HTTP ${response.status})`;
    } catch (e) {
      // Not an OpenAI error body (a proxy's page, say): the status line says enough.
    }
    if (response.status === 401) {
      ui.auth.hidden = false;
      ui.apiKey.focus();
      return new ChatError("The server needs an API key: " + message, "auth");
    }
    return new ChatError("The server refused the request: " + message, "api");
  }

  // Any failure as a ChatError: fetch and stream reads reject with a TypeError when the
  // connection cannot be made or breaks.
  function describe(e, lost) {
    if (e instanceof ChatError) return e;
    if (e instanceof TypeError) return new ChatError(lost, "connection");
    return new ChatError("Unexpected reply from the server: " + e.message, "api");
  }

  async function loadModel(signal) {
    const response = await api("v1/models", { signal });
    if (!response.ok) throw await apiError(response);
    const list = await response.json();
    const first = list && Array.isArray(list.data) && list.data[0];
    if (!first) throw new ChatError("The server lists no model.", "api");
    state.model = String(first.id);
    ui.model.textContent = state.model;
  }

  async function connect() {
    setStatus("Connecting…");
    try {
      await loadModel();
      setStatus("Ready.");
    } catch (e) {
      setStatus(describe(e, "Cannot reach the server.").message, true);
    }
  }

  function requestBody(history) {
    const s = readSettings();
    const samples = Math.max(1, parseInt(s["self-consistency"], 10) || 1);
    const messages = [];
    if (s.system.trim()) messages.push({ role: "system", content: s.system });
    for (const m of history) messages.push({ role: m.role, content: m.content });
    const body = {
      model: state.model,
      messages,
      // The vote needs every sample whole, so self-consistency answers are not streamed.
      stream: samples === 1,
      lmforge: {
        cot: s.cot,
        self_consistency: samples,
        tools: Object.keys(TOOL_TAGS).filter((name) => s["tool-" + name]),
      },
    };
    const temperature = parseFloat(s.temperature);
    if (Number.isFinite(temperature)) body.temperature = temperature;
    const topP = parseFloat(s["top-p"]);
    if (Number.isFinite(topP)) body.top_p = topP;
    const maxTokens = parseInt(s["max-tokens"], 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    return body;
  }

  // Server-Sent Events: "data:" lines, an empty line ends an event, "[DONE]" ends the answer.
  async function readStream(response, reply) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let data = [];
    // One line of the stream; true once the answer is complete.
    const take = (raw) => {
      const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
      if (line.startsWith("data:")) {
        data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      } else if (line === "" && data.length) {
        const event = data.join("\n");
        data = [];
        return takeEvent(event, reply);
      }
      return false;
    };
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const line of lines) if (take(line)) return;
    }
    // The body has ended, perhaps right after "data: [DONE]" with no newline or blank line
    // after it: what is left is still the last line and event. Left unparsable, it is the
    // cut-off end of a broken connection.
    buffer += decoder.decode();
    try {
      if (take(buffer) || take("")) return;
    } catch (e) {
      if (!(e instanceof SyntaxError)) throw e;
    }
    // No [DONE]: the server went away mid-answer.
    throw new ChatError(LOST, "connection");
  }

  function takeEvent(data, reply) {
    if (data === "[DONE]") return true;
    const event = JSON.parse(data);
    if (event.error) {
      throw new ChatError("The server failed: " + errorMessage(event.error), "api");
    }
    const choice = event.choices && event.choices[0];
    if (!choice) return false; // the usage chunk
    if (choice.delta && typeof choice.delta.content === "string") {
      reply.content += choice.delta.content;
    }
    if (choice.finish_reason) reply.finish = choice.finish_reason;
    if (choice.lmforge && choice.lmforge.tool_calls) reply.toolCalls = choice.lmforge.tool_calls;
    if (!frame) {
      frame = requestAnimationFrame(() => {
        frame = 0;
        redraw(reply);
      });
    }
    return false;
  }

  function takeWhole(body, reply) {
    const choice = body.choices[0];
    reply.content = (choice.message && choice.message.content) || "";
    reply.finish = choice.finish_reason;
    const extra = choice.lmforge || {};
    reply.toolCalls = extra.tool_calls;
    reply.vote = extra.self_consistency;
  }

  // --- Conversation actions -------------------------------------------------------------

  async function generate() {
    const history = state.messages.filter((m) => m.content);
    const controller = new AbortController();
    const reply = { role: "assistant", content: "", state: "streaming", tools: [] };
    state.messages.push(reply);
    state.busy = { controller };
    setBusy(true);
    renderAll();
    setStatus("Generating…");
    try {
      if (!state.model) await loadModel(controller.signal);
      const body = requestBody(history);
      reply.tools = body.lmforge.tools;
      const response = await api("v1/chat/completions", {
        method: "POST",
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) throw await apiError(response);
      if (body.stream) await readStream(response, reply);
      else takeWhole(await response.json(), reply);
      reply.state = "done";
      setStatus("Ready.");
    } catch (e) {
      if (controller.signal.aborted) {
        reply.state = "stopped";
        setStatus("Stopped.");
      } else {
        const error = describe(e, reply.content ? LOST : UNREACHABLE);
        reply.state = "error";
        reply.error = error.message;
        // The server may come back as another process (even with another model): ask again.
        if (error.kind === "connection") state.model = null;
        setStatus(error.message, true);
      }
    } finally {
      cancelAnimationFrame(frame);
      frame = 0;
      state.busy = null;
      setBusy(false);
      renderAll();
      save();
    }
  }

  function send() {
    const text = ui.input.value.trim();
    if (!text || state.busy) return;
    ui.input.value = "";
    state.messages.push({ role: "user", content: text, state: "done" });
    generate();
  }

  function stop() {
    if (state.busy) state.busy.controller.abort();
  }

  function regenerate() {
    const last = state.messages[state.messages.length - 1];
    if (state.busy || !last || last.role !== "assistant") return;
    state.messages.pop();
    generate();
  }

  function edit(msg) {
    const node = views.get(msg);
    const area = el("textarea", "edit-input");
    area.value = msg.content;
    area.rows = Math.min(10, msg.content.split("\n").length + 1);
    area.dataset.testid = "edit-input";
    area.setAttribute("aria-label", "Edit your message");
    const resend = () => {
      const text = area.value.trim();
      if (!text || state.busy) return;
      msg.content = text;
      state.messages.splice(state.messages.indexOf(msg) + 1); // what followed answered the old text
      generate();
    };
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        resend();
      } else if (e.key === "Escape") {
        e.stopPropagation();
        renderAll();
      }
    });
    const box = el("div", "edit");
    const row = el("div", "row");
    row.append(button("Send", "edit-save", resend), button("Cancel", "edit-cancel", renderAll));
    box.append(area, row);
    node.querySelector(".msg-body").replaceWith(box);
    node.querySelector(".msg-actions").hidden = true;
    area.focus();
  }

  function newChat() {
    stop();
    state.messages = [];
    renderAll();
    save();
    setStatus(state.model ? "Ready." : "");
    ui.input.focus();
  }

  function setBusy(busy) {
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
    document.body.classList.toggle("busy", busy);
  }

  // --- Copying --------------------------------------------------------------------------

  // navigator.clipboard needs a secure context (https or localhost) and the page's focus; a
  // selected off-screen textarea and execCommand("copy") work on plain http too.
  async function copyText(text, target) {
    let ok = true;
    try {
      await navigator.clipboard.writeText(text);
    } catch (e) {
      const area = el("textarea", "offscreen");
      area.value = text;
      area.readOnly = true;
      document.body.append(area);
      area.select();
      try {
        ok = document.execCommand("copy");
      } catch (err) {
        ok = false;
      }
      area.remove();
    }
    const label = target.textContent;
    target.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => {
      target.textContent = label;
    }, 1500);
  }

  // --- Rendering ------------------------------------------------------------------------

  function renderAll() {
    const last = state.messages[state.messages.length - 1];
    const lastUser = [...state.messages].reverse().find((m) => m.role === "user");
    const nodes = state.messages.map((m) => view(m, m === last, m === lastUser));
    ui.messages.replaceChildren(...(nodes.length ? nodes : [ui.empty]));
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  // Redraw one message in place (while it streams), keeping the view at the bottom if the
  // reader was there.
  function redraw(msg) {
    const old = views.get(msg);
    if (!old || !old.isConnected) return;
    const list = ui.messages;
    const atEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 48;
    old.replaceWith(view(msg, true, false));
    if (atEnd) list.scrollTop = list.scrollHeight;
  }

  function view(msg, isLast, isLastUser) {
    const node = el("article", "msg " + msg.role);
    node.dataset.testid = "message";
    node.dataset.role = msg.role;
    node.dataset.state = msg.state || "done";
    const head = el("div", "msg-head muted", msg.role === "user" ? "You" : "Assistant");
    const body = el("div", "msg-body");
    body.dataset.testid = "message-body";
    if (msg.role === "user") body.textContent = msg.content;
    else body.append(answerOrText(msg));
    node.append(head, body);
    if (msg.vote) node.append(voteView(msg.vote));
    const note = noteText(msg);
    if (note) {
      const p = el("p", "msg-note " + (msg.state === "error" ? "error" : "muted"), note);
      p.dataset.testid = "message-note";
      node.append(p);
    }
    const actions = el("div", "msg-actions");
    if (msg.state !== "streaming") {
      const copy = button("Copy", "copy", () => copyText(msg.content, copy));
      copy.title = "Copy the message as Markdown";
      actions.append(copy);
    }
    if (!state.busy && isLastUser) actions.append(button("Edit", "edit", () => edit(msg)));
    if (!state.busy && isLast && msg.role === "assistant") {
      actions.append(button("Regenerate", "regenerate", regenerate));
    }
    node.append(actions);
    views.set(msg, node);
    return node;
  }

  function noteText(msg) {
    if (msg.state === "error") return msg.error;
    if (msg.state === "stopped") return "Stopped; the answer is incomplete.";
    if (msg.state === "streaming" && !msg.content) return "…";
    if (msg.finish === "length") return "Cut off at the token limit (Max tokens).";
    return "";
  }

  function voteView(vote) {
    const box = el("div", "vote");
    box.dataset.testid = "vote";
    const answers = Array.isArray(vote.answers) ? vote.answers.map(String) : [];
    const agree = answers.filter((a) => a === String(vote.answer)).length;
    const share = Math.round(Number(vote.vote_share) * 100);
    const title = el("div");
    title.append("Self-consistency vote: ");
    title.append(el("strong", "", String(vote.answer)));
    title.append(` (${agree}/${answers.length} samples, ${share}%)`);
    box.append(title, el("div", "muted", "answers: " + answers.join(", ")));
    return box;
  }

  // An answer that fails to render shows as the text it is: the failure must not escape, since
  // at load it would stop the page before it connects, and while streaming the answer would
  // stay at "…".
  function answerOrText(msg) {
    try {
      return renderAnswer(msg);
    } catch (e) {
      return document.createTextNode(msg.content);
    }
  }

  // The answer's Markdown with each tool call (<calc>…</calc><result>…</result>, streamed as
  // the server ran it) shown as a marked inline element rather than as raw tags.
  function renderAnswer(msg) {
    const tools = Array.isArray(msg.tools) ? msg.tools : [];
    const tags = tools.map((name) => TOOL_TAGS[name]).filter(Boolean);
    const calls = [];
    let text = msg.content;
    if (tags.length) {
      // Private-use characters mark where each call goes; any the model wrote are dropped.
      const pattern = new RegExp(
        `<(${tags.join("|")})>([\\s\\S]*?)(?:</\\1>(?:<result>([\\s\\S]*?)(?:</result>|$))?|$)`,
        "g",
      );
      text = text.replace(/[\uE000\uE001]/g, "").replace(pattern, (_, tag, argument, result) => {
        calls.push({ name: TOOL_NAMES[tag], argument: argument.trim(), result });
        return "\uE000" + (calls.length - 1) + "\uE001";
      });
    }
    const fragment = window.LmMarkdown.render(text, { breaks: true });
    if (calls.length) placeToolCalls(fragment, calls, msg);
    for (const pre of fragment.querySelectorAll("pre")) {
      const box = el("div", "code-block");
      const bar = el("div", "code-bar");
      const copy = button("Copy code", "copy-code", () =>
        copyText(pre.querySelector("code").textContent, copy),
      );
      bar.append(el("span", "muted", pre.dataset.lang || "code"), copy);
      pre.replaceWith(box);
      box.append(bar, pre);
    }
    return fragment;
  }

  function placeToolCalls(root, calls, msg) {
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    const marked = [];
    for (let n = walker.nextNode(); n; n = walker.nextNode()) {
      if (n.data.includes("\uE000")) marked.push(n);
    }
    for (const node of marked) {
      const parts = node.data.split(/\uE000(\d+)\uE001/);
      node.replaceWith(
        ...parts.map((part, k) =>
          k % 2 ? toolCallView(calls[Number(part)], msg, Number(part)) : part,
        ),
      );
    }
  }

  function toolCallView(call, msg, index) {
    // The server's record of the call (last stream chunk) once it has arrived, else the text.
    const record = msg.toolCalls && msg.toolCalls[index];
    const info = record && record.name === call.name ? record : call;
    const node = el("span", "tool-call");
    node.dataset.testid = "tool-call";
    node.dataset.tool = call.name;
    const pending = info.result === undefined || info.result === null;
    const result = pending ? (msg.state === "streaming" ? "running…" : "not run") : info.result;
    node.append(
      el("span", "tool-name", call.name),
      el("code", "tool-arg", String(info.argument)),
      el("span", "tool-arrow", "→"),
      el("span", "tool-result" + (pending ? " pending" : ""), String(result)),
    );
    return node;
  }

  // --- Wiring ---------------------------------------------------------------------------

  function setSettingsOpen(open) {
    document.body.classList.toggle("settings-open", open);
    ui.settingsToggle.setAttribute("aria-expanded", String(open));
  }

  function saveKey() {
    const key = ui.apiKey.value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    ui.apiKey.value = "";
    ui.auth.hidden = true;
    connect();
  }

  ui.send.addEventListener("click", send);
  ui.stop.addEventListener("click", stop);
  // On a touch screen there is no Shift+Enter, so Enter keeps its newline and Send sends.
  const enterSends = !window.matchMedia("(pointer: coarse)").matches;
  ui.input.addEventListener("keydown", (e) => {
    if (enterSends && e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.busy) stop();
  });
  $("new-chat").addEventListener("click", newChat);
  ui.settingsToggle.addEventListener("click", () =>
    setSettingsOpen(!document.body.classList.contains("settings-open")),
  );
  ui.settings.addEventListener("change", save);
  $("api-key-save").addEventListener("click", saveKey);
  ui.apiKey.addEventListener("keydown", (e) => {
    if (e.key === "Enter") saveKey();
  });

  load();
  // Wide screens show the settings beside the chat; on a phone they open over it on demand.
  setSettingsOpen(window.matchMedia("(min-width: 900px)").matches);
  renderAll();
  connect();
})();
