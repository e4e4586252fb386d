-- Soak of `clawlua mcp` under continuous load (issue 14; not part of CI).
--
-- Starts `clawlua mcp` as a child, creates jail and VM sandboxes through tools/call, then keeps
-- requests in flight for the whole duration: execs, file writes read back, audit queries,
-- sandbox lists and pings across every sandbox, and (with --churn) replaces a jail now and
-- then. Samples the server's RSS, fds and threads; counts requests sent against responses
-- (each id answered exactly once, no stray id), checks every result's content; at the end
-- destroys every sandbox through the tools, closes the server, verifies the audit chain it
-- wrote (`clawlua audit verify`) and diffs the host against its state before the run
-- (`scripts/leak-audit`). Exits 0 only if all of that holds. Needs root (jails, VMs).
--
-- usage: build/bin/clawlua tests/soak/mcp_soak.lua [options]
--   --duration S     seconds of load (default 1800)
--   --jails N        jail sandboxes (default 100)
--   --vms N          VM sandboxes (default 4)
--   --inflight N     requests kept in flight (default 16)
--   --churn S        replace one jail every S seconds, 0 = never (default 10)
--   --sample S       seconds between RSS samples (default 10)
--   --out DIR        where the audit log, server log and report.json go (default a temp dir)
--   --timeout S      a request unanswered after S seconds counts as lost (default 300)
--   --strict 0|1     1: anything new on the host fails the run, also what cannot be traced to
--                    this run (default 0: the machine is shared, so only what names this run's
--                    server pid, sandboxes, VMs or out dir fails it; the rest is listed)
local claw = require "clawlua"

local json, proc = claw.json, claw.proc

local root = (arg[0]:match("^(.*)/[^/]*$") or ".") .. "/../.."

local opts = { duration = 1800, jails = 100, vms = 4, inflight = 16, churn = 10, sample = 10,
               timeout = 300, strict = 0 }
do
  local i = 1
  while arg[i] do
    local name = arg[i]:match("^%-%-(%w+)$")
    local v = arg[i + 1]
    if name == "out" and v then
      opts.out = v
    elseif name and opts[name] ~= nil and tonumber(v) then
      opts[name] = tonumber(v)
    else
      io.stderr:write("mcp_soak: bad argument '", tostring(arg[i]), "' (see the usage at the top of ",
        arg[0], ")\n")
      os.exit(2)
    end
    i = i + 2
  end
end

local function log(fmt, ...)
  io.stdout:write(("[%7.1f] "):format(claw.now() - (opts.t0 or claw.now())), fmt:format(...), "\n")
  io.stdout:flush()
end

local function sh(cmd)
  local r = proc.run { "sh", "-c", cmd, timeout = 600 }
  return r.code == 0, (r.stdout or "") .. (r.stderr or "")
end

local function proc_status(pid)
  local f = io.open(("/proc/%d/status"):format(pid))
  if not f then return nil end
  local s = f:read("a")
  f:close()
  local fds = 0
  local p = io.popen(("ls /proc/%d/fd 2>/dev/null | wc -l"):format(pid))
  if p then
    fds = tonumber(p:read("a")) or 0
    p:close()
  end
  return { rss_kb = tonumber(s:match("VmRSS:%s*(%d+)")), hwm_kb = tonumber(s:match("VmHWM:%s*(%d+)")),
           threads = tonumber(s:match("Threads:%s*(%d+)")), fds = fds }
end

local stats = { sent = 0, answered = 0, duplicate = 0, stray = 0, lost = 0, rpc_errors = 0,
                tool_errors = 0, wrong = 0, by_tool = {}, errors = {}, churned = 0 }

local function note_error(what)
  if #stats.errors < 50 then stats.errors[#stats.errors + 1] = what end
  log("error: %s", what)
end

claw.run(function()
  opts.t0 = claw.now()
  local out = opts.out or os.tmpname() .. ".soak"
  os.execute("mkdir -p " .. out)
  local audit_path = out .. "/audit.jsonl"
  os.remove(audit_path)
  local host_before = out .. "/host-before.txt"
  assert(sh(("%s/scripts/leak-audit save %s"):format(root, host_before)))
  log("out: %s; %d jails, %d VMs, %d in flight, %d s, churn every %s s", out, opts.jails, opts.vms,
    opts.inflight, opts.duration, opts.churn)

  -- the server's policy: the default's jail (and its seccomp filter), with a quota and a
  -- lifetime that fit the run (the default's 32 sandboxes and 600 s do not)
  local nsb = opts.jails + opts.vms + 2
  local policy_path = out .. "/policy.lua"
  local pf = assert(io.open(policy_path, "w"))
  pf:write(("return { name = 'soak', backend = 'jail',\n" ..
    "  resources = { memory_mib = 128, lifetime_s = %d },\n" ..
    "  quota = { max_sandboxes = %d, memory_mib = %d, max_execs = 64 } }\n"):format(
    math.ceil(opts.duration) + 900, nsb, nsb * 128))
  pf:close()
  local server = assert(proc.spawn {
    root .. "/build/bin/clawlua", "mcp", "--max-sandboxes", tostring(nsb), "--policy", policy_path,
    "--audit-log", audit_path, "--log-level", "warning",
    stdin = "pipe", stdout = "pipe", stderr = { path = out .. "/server.stderr", mode = "w" },
  })
  local spid = server:pid()
  -- Ctrl-C or SIGTERM: the server gets SIGTERM and destroys its sandboxes before it exits
  -- (closing its handle would SIGKILL it and leave them to `clawlua cleanup`)
  claw.on_shutdown(function()
    server:kill("TERM")
    server:wait(5)
  end)

  -- the connection: one writer task over a queue, one reader task matching ids
  local pending, next_id = {}, 0
  local wq = claw.channel(256)
  local writer = claw.spawn(function()
    while true do
      local line = wq:recv()
      if line == nil then break end
      server.stdin:write(line, "\n")
    end
  end)
  local reader = claw.spawn(function()
    while true do
      local line = server.stdout:read_line(64 << 20)
      if line == nil then break end
      local msg = json.decode(line)
      if not msg then
        note_error("undecodable line from the server: " .. line:sub(1, 200))
      elseif msg.id ~= nil and msg.method == nil then
        local p = math.type(msg.id) == "integer" and pending[msg.id]
        if p then
          pending[msg.id] = nil
          stats.answered = stats.answered + 1
          p.msg = msg
          p.ev:set()
        elseif math.type(msg.id) == "integer" and msg.id >= 1 and msg.id <= next_id then
          stats.duplicate = stats.duplicate + 1
          note_error("duplicate or late response for id " .. msg.id)
        else
          stats.stray = stats.stray + 1
          note_error("response with an id never sent: " .. tostring(msg.id))
        end
      end
    end
  end)

  local function request(method, params)
    next_id = next_id + 1
    local id = next_id
    local p = { ev = claw.event() }
    pending[id] = p
    stats.sent = stats.sent + 1
    wq:send(assert(json.encode { jsonrpc = "2.0", id = id, method = method, params = params }))
    if not p.ev:wait(opts.timeout) then
      pending[id] = nil
      stats.lost = stats.lost + 1
      note_error(("no response to %s (id %d) in %d s"):format(method, id, opts.timeout))
      return nil
    end
    if p.msg.error then
      stats.rpc_errors = stats.rpc_errors + 1
      note_error(("%s: rpc error %s"):format(method, json.encode(p.msg.error)))
      return nil
    end
    return p.msg.result
  end

  local function call(tool, args)
    local t0 = claw.now()
    local r = request("tools/call", { name = tool, arguments = args or json.object {} })
    local b = stats.by_tool[tool] or { n = 0, ms = 0, max_ms = 0 }
    stats.by_tool[tool] = b
    local ms = (claw.now() - t0) * 1000
    b.n, b.ms, b.max_ms = b.n + 1, b.ms + ms, math.max(b.max_ms, ms)
    if r and r.isError then
      stats.tool_errors = stats.tool_errors + 1
      note_error(("%s: %s"):format(tool, r.content and r.content[1] and r.content[1].text or "?"))
      return nil
    end
    return r and r.structuredContent
  end

  local init = request("initialize", { protocolVersion = "2025-11-25", capabilities = json.object {},
                                       clientInfo = { name = "mcp_soak", version = "1" } })
  assert(init and init.protocolVersion, "initialize failed")
  wq:send(json.encode { jsonrpc = "2.0", method = "notifications/initialized" })

  -- RSS curve
  local samples = {}
  local function sample()
    local s = proc_status(spid)
    if s then
      s.t = math.floor(claw.now() - opts.t0)
      s.sent, s.answered = stats.sent, stats.answered
      samples[#samples + 1] = s
      log("server rss %d KiB (hwm %d), fds %d, threads %d; sent %d, answered %d, errors %d",
        s.rss_kb, s.hwm_kb, s.fds, s.threads, stats.sent, stats.answered,
        stats.rpc_errors + stats.tool_errors + stats.wrong)
    end
  end
  sample()
  local sampler = claw.spawn(function()
    while true do
      claw.sleep(opts.sample)
      sample()
    end
  end)

  -- create the sandboxes, several at once
  local jails, vms = {}, {}
  -- what this run's objects are named after, to tell them from other users' of the host
  local tokens = { "clawlua-" .. spid .. "-", out }
  local function create(backend)
    local r = call("sandbox_create", { backend = backend })
    if not (r and r.id) then return nil end
    tokens[#tokens + 1] = r.id
    local vm = type(r.vm) == "table" and r.vm or {}
    for _, k in ipairs { "id", "tap", "rundir" } do
      if type(vm[k]) == "string" and #vm[k] > 3 then tokens[#tokens + 1] = vm[k] end
    end
    return r.id
  end
  local function create_all(list, n, backend, width)
    local todo = n
    local ws = {}
    for w = 1, width do
      ws[w] = claw.spawn(function()
        while todo > 0 do
          todo = todo - 1
          local id = create(backend)
          if id then list[#list + 1] = id end
        end
      end)
    end
    for _, w in ipairs(ws) do w:join() end
  end
  local c0 = claw.now()
  create_all(vms, opts.vms, "vm", 2)
  log("%d VMs up in %.1f s", #vms, claw.now() - c0)
  c0 = claw.now()
  create_all(jails, opts.jails, "jail", 8)
  log("%d jails up in %.1f s", #jails, claw.now() - c0)
  local created = #jails + #vms
  local all_ok = #jails == opts.jails and #vms == opts.vms
  if not all_ok then note_error(("created %d/%d jails, %d/%d VMs"):format(#jails, opts.jails, #vms, opts.vms)) end
  local rss_loaded = proc_status(spid)

  -- the load
  local busy = {} -- ids being replaced by churn are not picked
  local function pick()
    local pool = (#vms > 0 and math.random(10) == 1) and vms or jails
    if #pool == 0 then pool = #jails > 0 and jails or vms end
    for _ = 1, 5 do
      local id = pool[math.random(#pool)]
      if not busy[id] then return id end
    end
    return nil
  end
  local function check(ok, what)
    if not ok then
      stats.wrong = stats.wrong + 1
      note_error("wrong result: " .. what)
    end
  end
  local ops = {
    function(id, n) -- exec with stdin and env
      local script = "echo \"$SOAK_N\"; cat; echo x >&2"
      local r = call("sandbox_exec", { id = id, command = json.array { "sh", "-c", script },
                                       stdin = "in" .. n, env = { SOAK_N = tostring(n) }, timeout_s = 60 })
      if r then check(r.exit_code == 0 and r.stdout == n .. "\nin" .. n and r.stderr == "x\n",
        ("exec in %s: %s"):format(id, json.encode(r))) end
    end,
    function(id, n, w) -- a file written and read back (one name per worker: the sandbox does not grow)
      local size = (n % 7 == 0) and 65536 or (n % 500 + 1)
      local data = (("%d:"):format(n)):rep(size // #tostring(n) + 1):sub(1, size)
      local path = ("/tmp/soak-%d.txt"):format(w)
      local wr = call("sandbox_write_file", { id = id, path = path, content = data })
      if not wr then return end
      check(wr.bytes == #data, "write_file bytes")
      local r = call("sandbox_read_file", { id = id, path = path })
      if r then
        check(r.content == data, ("read_file in %s: %d bytes back, %d written"):format(id, #(r.content or ""), #data))
      end
    end,
    function(id) -- what the sandbox did, from the audit
      local r = call("audit_query", { sandbox = id, limit = 20 })
      if r then check(type(r.events) == "table" and #r.events > 0, "audit_query for " .. id .. " is empty") end
    end,
    function(id, n) -- an exec whose command fails, a non-zero exit is a result
      local r = call("sandbox_exec", { id = id, command = json.array { "sh", "-c", "exit " .. (n % 100 + 1) } })
      if r then check(r.exit_code == n % 100 + 1, "exit code") end
    end,
    function(_, n)
      if n % 10 == 0 then
        local r = call("sandbox_list", {})
        if r then check(#r.sandboxes >= #jails + #vms - 1, ("sandbox_list has %d"):format(#r.sandboxes)) end
      else
        local r = request("ping", json.object {})
        check(r ~= nil, "ping")
      end
    end,
  }
  local stop = false
  local counter = 0
  local workers = {}
  for w = 1, opts.inflight do
    workers[w] = claw.spawn(function()
      while not stop do
        counter = counter + 1
        local n = counter
        local id = pick()
        if id then ops[n % #ops + 1](id, n, w) else claw.sleep(0.01) end
      end
    end)
  end
  local churner
  if opts.churn > 0 then
    churner = claw.spawn(function()
      while not stop do
        claw.sleep(opts.churn)
        if stop or #jails == 0 then break end
        local k = math.random(#jails)
        local old = jails[k]
        busy[old] = true
        claw.sleep(2) -- lets requests already aimed at it finish (an exec is < 60 s; a miss is a tool error)
        local r = call("sandbox_destroy", { id = old })
        check(r and r.destroyed == true, "churn destroy " .. old)
        local id = create("jail")
        if id then jails[k] = id else table.remove(jails, k) end
        busy[old] = nil
        stats.churned = stats.churned + 1
        created = created + (id and 1 or 0)
      end
    end)
  end
  claw.sleep(opts.duration)
  stop = true
  for _, w in ipairs(workers) do w:join() end
  if churner then churner:join() end
  local rss_end_load = proc_status(spid)
  log("load stopped: %d requests sent, %d answered", stats.sent, stats.answered)

  -- tear down through the tools
  local destroyed = 0
  local all = {}
  for _, id in ipairs(vms) do all[#all + 1] = id end
  for _, id in ipairs(jails) do all[#all + 1] = id end
  local ws = {}
  for w = 1, 8 do
    ws[w] = claw.spawn(function()
      while #all > 0 do
        local id = table.remove(all)
        local r = call("sandbox_destroy", { id = id })
        if r and r.destroyed then destroyed = destroyed + 1 else note_error("destroy " .. id) end
      end
    end)
  end
  for _, w in ipairs(ws) do w:join() end
  local left = call("sandbox_list", {})
  local left_n = left and #left.sandboxes or -1
  sample()
  wq:close()
  writer:join()
  server.stdin:close()
  local st = server:wait(30)
  reader:join(5)
  sampler:cancel()
  local exit_ok = st and st.code == 0
  if not exit_ok then note_error("server exit: " .. json.encode(st or { "did not exit in 30 s" })) end
  for _ in pairs(pending) do stats.lost = stats.lost + 1 end

  local files = {}
  for _, f in ipairs(claw.audit.log_files(audit_path)) do files[#files + 1] = f end
  local vok, vout = sh(("%s/build/bin/clawlua audit verify %s"):format(root, table.concat(files, " ")))
  local audit_records = 0
  for _, f in ipairs(files) do
    local h = io.open(f)
    for _ in h:lines() do audit_records = audit_records + 1 end
    h:close()
  end
  -- the host against its state before the run: new objects naming this run fail it
  local _, lout = sh(("%s/scripts/leak-audit diff %s"):format(root, host_before))
  local ours, others = {}, {}
  for line in lout:gmatch("\n  ([^\n]+)") do
    local mine = false
    for _, t in ipairs(tokens) do
      if line:find(t, 1, true) then mine = true end
    end
    if mine then ours[#ours + 1] = line else others[#others + 1] = line end
  end
  local lok = #ours == 0 and (opts.strict == 0 or #others == 0)

  local first, last = samples[1], samples[#samples]
  local report = {
    options = opts, sent = stats.sent, answered = stats.answered, lost = stats.lost,
    duplicate = stats.duplicate, stray = stats.stray, rpc_errors = stats.rpc_errors,
    tool_errors = stats.tool_errors, wrong = stats.wrong, errors = stats.errors,
    by_tool = stats.by_tool, churned = stats.churned, created = created, destroyed = destroyed,
    listed_after_destroy = left_n, server_exit = st, rss_start_kb = first.rss_kb,
    rss_loaded_kb = rss_loaded and rss_loaded.rss_kb, rss_end_load_kb = rss_end_load and rss_end_load.rss_kb,
    rss_end_kb = last.rss_kb, rss_curve = samples, audit_files = files, audit_records = audit_records,
    audit_verify = { ok = vok, output = vout },
    leak_audit = { ok = lok, ours = json.array(ours), others = json.array(others) },
  }
  local f = assert(io.open(out .. "/report.json", "w"))
  f:write(json.encode(report, { pretty = true, sort_keys = true }), "\n")
  f:close()

  print(("\nsoak: %d s, %d jails + %d VMs (%d created in all, %d churned), %d in flight"):format(
    opts.duration, opts.jails, opts.vms, created, stats.churned, opts.inflight))
  print(("requests: %d sent, %d answered, %d lost, %d duplicated, %d stray; rpc errors %d, tool errors %d, "
    .. "wrong results %d"):format(
    stats.sent, stats.answered, stats.lost, stats.duplicate, stats.stray, stats.rpc_errors,
    stats.tool_errors, stats.wrong))
  local names = {}
  for k in pairs(stats.by_tool) do names[#names + 1] = k end
  table.sort(names)
  for _, k in ipairs(names) do
    local b = stats.by_tool[k]
    print(("  %-20s %8d calls, mean %7.1f ms, max %8.1f ms"):format(k, b.n, b.ms / b.n, b.max_ms))
  end
  print(("server RSS: start %d KiB, all sandboxes up %d KiB, end of load %d KiB, after teardown %d KiB "
    .. "(peak %d KiB)"):format(
    first.rss_kb, rss_loaded and rss_loaded.rss_kb or -1, rss_end_load and rss_end_load.rss_kb or -1,
    last.rss_kb, last.hwm_kb))
  print(("server fds: start %d, end %d; exit %s"):format(first.fds, last.fds, json.encode(st or {})))
  print(("sandboxes: %d destroyed, %d listed after"):format(destroyed, left_n))
  print(("audit: %d records in %d file(s), verify: %s"):format(audit_records, #files, vout:gsub("\n$", "")))
  print(("host: %d new object(s) of this run left%s"):format(#ours, #ours > 0 and ":" or ""))
  for _, l in ipairs(ours) do print("  " .. l) end
  print(("      %d new object(s) not traced to this run (other users of the machine)%s"):format(#others,
    #others > 0 and ":" or ""))
  for _, l in ipairs(others) do print("  " .. l) end
  print("report: " .. out .. "/report.json")
  local ok = all_ok and stats.lost == 0 and stats.duplicate == 0 and stats.stray == 0 and stats.rpc_errors == 0
    and stats.tool_errors == 0 and stats.wrong == 0 and left_n == 0 and exit_ok and vok and lok
  print(ok and "SOAK PASSED" or "SOAK FAILED")
  os.exit(ok and 0 or 1)
end)
