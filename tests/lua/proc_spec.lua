-- clawlua.proc: spawning, pipes, waiting, signals, clean-up.
local claw = require "clawlua"
local H = require "helper"
local proc = claw.proc

describe("proc.spawn", function()
  it("runs a program with pipes and reports its exit code", function()
    local p = assert(proc.spawn { "sh", "-c", "read x; echo got:$x; echo oops >&2; exit 7",
                                  stdin = "pipe", stdout = "pipe", stderr = "pipe" })
    assert.is_true(p:pid() > 0)
    assert(p.stdin:write("hello\n"))
    p.stdin:close()
    assert.are.equal("got:hello", p.stdout:read_line())
    assert.are.equal("oops", p.stderr:read_line())
    local st = assert(p:wait())
    assert.are.equal(7, st.code)
    assert.is_nil(st.signal)
    assert.are.equal(p:pid(), st.pid)
    p:close()
  end)

  it("accepts argv=, env (merged, or on an empty base with env_clear) and cwd", function()
    local r = assert(proc.run { argv = { "sh", "-c", "echo $A-$B-$HOME; pwd" }, env = { A = "1", B = "2" },
                                env_clear = true, cwd = "/tmp" })
    assert.are.equal("1-2-\n/tmp\n", r.stdout)
    r = assert(proc.run { "sh", "-c", "echo $CLAW_X; test -n \"$PATH\"", env = { CLAW_X = "y" } })
    assert.are.equal("y\n", r.stdout)
    assert.are.equal(0, r.code)
    -- false unsets a variable of the base
    r = assert(proc.run { "sh", "-c", "echo ${HOME-unset}", env = { HOME = false } })
    assert.are.equal("unset\n", r.stdout)
    r = assert(proc.run { "/usr/bin/env", env_clear = true })
    assert.are.equal("", r.stdout)
  end)

  it("passes fds = {...} to the child as 3, 4, ... and nothing else", function()
    local r1, w1 = claw.stream.pipe()
    local r2, w2 = claw.stream.pipe()
    assert(w2:write("for fd 4\n"))
    w2:close()
    local p = assert(proc.spawn { "sh", "-c", "echo via-3 >&3; cat <&4; ls /proc/self/fd | wc -l",
                                  fds = { w1:fileno(), r2:fileno() }, stdout = "pipe" })
    w1:close()
    assert.are.equal("via-3", r1:read_line())
    -- 0, 1, 2, 3, 4 and the directory ls reads: nothing else leaked in
    assert.are.equal("for fd 4\n6\n", p.stdout:read_all())
    assert.are.equal(0, assert(p:wait()).code)
    p:close()
    r1:close()
    r2:close()
    assert.has_error(function() proc.spawn { "true", fds = { 987654 } } end,
      "bad field 'fds' (entry 1 is not an open file descriptor)")
  end)

  it("connects stdio to files and to /dev/null", function()
    local dir = H.tmpdir()
    local r = assert(proc.run { "sh", "-c", "cat; echo err >&2",
      stdin = { path = H.src .. "/tests/lua/helper.lua" }, stdout = { path = dir .. "/out" },
      stderr = "stdout" })
    assert.are.equal(0, r.code)
    local out = H.read_file(dir .. "/out")
    assert.matches("^%-%- Shared test helpers", out)
    assert.matches("err\n$", out)
    local f = assert(io.open(dir .. "/out2", "w"))
    assert(proc.run { "echo", "to a lua file", stdout = f })
    f:close()
    assert.are.equal("to a lua file\n", H.read_file(dir .. "/out2"))
    r = assert(proc.run { "cat" }) -- no stdin: /dev/null
    assert.are.equal("", r.stdout)
    r = assert(proc.run { "cat", stdin = "null" }) -- a string is data for run
    assert.are.equal("null", r.stdout)
    r = assert(proc.run { "cat", stdin = { path = "/dev/null" } }) -- anything else is a slot
    assert.are.equal("", r.stdout)
    H.rm_rf(dir)
  end)

  it("gives children default signal dispositions and an empty signal mask", function()
    -- the runtime ignores SIGPIPE and blocks SIGINT/SIGTERM for its signalfd; children must not
    -- inherit either
    local r = assert(proc.run { "grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status" })
    assert.matches("SigBlk:%s+0+\n", r.stdout)
    assert.matches("SigIgn:%s+0+\n", r.stdout)
    r = assert(proc.run { "sh", "-c", "yes | head -c 1" })
    assert.are.equal("", r.stderr) -- yes died of SIGPIPE instead of reporting EPIPE
  end)

  it("reports death by signal", function()
    local r = assert(proc.run { "sh", "-c", "kill -SEGV $$" })
    assert.is_nil(r.code)
    assert.are.equal(11, r.signal)
    assert.are.equal("SIGSEGV", r.signal_name)
  end)

  it("kills on request, with names or numbers, and the whole group on request", function()
    local p = assert(proc.spawn { "sh", "-c", "sleep 30 & sleep 30; wait" })
    claw.sleep(0.05)
    assert(p:kill("TERM", "group"))
    local st = assert(p:wait(5))
    assert.are.equal("SIGTERM", st.signal_name)
    local ok, kerr = p:kill(9)
    assert.is_nil(ok)
    assert.are.equal("kill: process " .. p:pid() .. " has exited", kerr)
    p:close()
    -- the background sleep was in the group: nothing of it remains
    assert.is_true(H.eventually(function() return H.children() == 0 end))
  end)

  it("wait times out without killing, and waits again", function()
    local p = assert(proc.spawn { "sleep", "0.3" })
    assert.are.same({ nil, "timeout", "ETIMEDOUT" }, { p:wait(0.01) })
    assert.is_true(p:running())
    local st = assert(p:wait(5))
    assert.are.equal(0, st.code)
    assert.is_true(st.duration >= 0.25)
    assert.are.equal(0, assert(p:wait()).code)
    p:close()
  end)

  it("a task waiting on a process does not block other tasks", function()
    local p = assert(proc.spawn { "sleep", "0.2" })
    local ticks = 0
    local ticker = claw.spawn(function()
      for _ = 1, 5 do claw.sleep(0.01); ticks = ticks + 1 end
    end)
    local waiter = claw.spawn(function() return p:wait() end)
    assert.are.equal(0, waiter:join().code)
    ticker:join()
    assert.are.equal(5, ticks)
    p:close()
  end)

  it("fails cleanly for bad input, leaving nothing behind", function()
    H.settle()
    local fds, kids = H.fds(), H.children()
    local p, err = proc.spawn { "/nonexistent/binary" }
    assert.is_nil(p)
    assert.are.equal("spawn /nonexistent/binary: No such file or directory", err)
    p, err = proc.spawn { "no-such-program-clawlua" }
    assert.is_nil(p)
    assert.are.equal("spawn no-such-program-clawlua: not found in PATH", err)
    local dir = H.tmpdir()
    H.write_file(dir .. "/plain", "not a program\n")
    H.write_file(dir .. "/garbage", "\127ELF garbage")
    H.sh("chmod 644 " .. dir .. "/plain; chmod 755 " .. dir .. "/garbage")
    p, err = proc.spawn { dir .. "/plain" }
    assert.is_nil(p)
    assert.are.equal("spawn " .. dir .. "/plain: Permission denied", err)
    p, err = proc.spawn { dir .. "/garbage" } -- fails in the child, after the clone
    assert.is_nil(p)
    assert.are.equal("spawn " .. dir .. "/garbage: exec: Exec format error", err)
    H.rm_rf(dir)
    p, err = proc.spawn { "true", cwd = "/nonexistent" }
    assert.is_nil(p)
    assert.are.equal("spawn true: cwd /nonexistent: No such file or directory", err)
    p, err = proc.spawn { "true", stdout = { path = "/nonexistent/dir/file" } }
    assert.is_nil(p)
    assert.are.equal("spawn true: /nonexistent/dir/file: No such file or directory", err)
    assert.has_error(function() proc.spawn {} end, "bad field 'argv' (empty)")
    assert.has_error(function() proc.spawn { "true", bogus = 1 } end, "bad field 'bogus' (unknown field)")
    assert.has_error(function() proc.spawn { "true", stdout = "file" } end)
    assert.has_error(function() proc.spawn { "true", env = { ["A=B"] = "x" } } end,
      "bad field 'env.A=B' (invalid variable name)")
    assert.has_error(function() proc.spawn { "true", 42 } end, "bad field 'argv' (entry 2 is number, string expected)")
    H.settle()
    assert.are.equal(fds, H.fds())
    assert.are.equal(kids, H.children())
  end)
end)

describe("process handles", function()
  it("kill and reap a running child when closed or collected: no zombies", function()
    H.settle()
    local kids = H.children()
    do
      local _p <close> = assert(proc.spawn { "sleep", "30" })
      assert.are.equal(kids + 1, H.children())
    end
    local pid
    do
      local p = assert(proc.spawn { "sleep", "30", stdout = "pipe" })
      pid = p:pid()
      p = nil -- luacheck: ignore
    end
    H.settle()
    assert.are.equal(kids, H.children())
    assert.is_nil(io.open("/proc/" .. pid .. "/stat")) -- not even a zombie
  end)

  it("survive many spawn/kill cycles with flat fd and child counts", function()
    H.settle()
    local fds, kids = H.fds(), H.children()
    for i = 1, 150 do
      local p = assert(proc.spawn { "sleep", "10", stdin = "pipe", stdout = "pipe", stderr = "pipe" })
      if i % 3 == 0 then
        p:kill("KILL")
        p:wait()
      elseif i % 3 == 1 then
        p:close()
      end -- else: dropped, the collector and the loop clean up
    end
    for _ = 1, 100 do
      local r = assert(proc.run { "true" })
      assert.are.equal(0, r.code)
    end
    H.settle()
    assert.is_true(H.eventually(function() H.settle() return H.children() == kids end, 10))
    assert.are.equal(fds, H.fds())
  end)
end)

describe("proc.run", function()
  it("feeds input and collects both streams", function()
    local r = assert(proc.run { "sh", "-c", "tr a-z A-Z; echo done >&2", stdin = "hello\n" })
    assert.are.equal("HELLO\n", r.stdout)
    assert.are.equal("done\n", r.stderr)
    assert.is_false(r.truncated)
    assert.is_false(r.timed_out)
  end)

  it("caps output and says so", function()
    local r = assert(proc.run { "sh", "-c", "yes | head -c 100000", max_output = 1000 })
    assert.are.equal(1000, #r.stdout)
    assert.is_true(r.truncated)
    assert.are.equal(0, r.code)
  end)

  it("kills the process group of a command that never exits", function()
    H.settle()
    local kids = H.children()
    local t0 = claw.now()
    local r = assert(proc.run { "sh", "-c", "sleep 60 & sleep 60", timeout = 0.2 })
    assert.is_true(r.timed_out)
    assert.are.equal("SIGKILL", r.signal_name)
    assert.is_true(claw.now() - t0 < 5 * H.scale)
    assert.is_true(H.eventually(function() return H.children() == kids end))
  end)

  it("finds executables on PATH", function()
    assert.matches("/sh$", proc.find_executable("sh"))
    assert.is_nil((proc.find_executable("no-such-program-clawlua")))
  end)
end)
