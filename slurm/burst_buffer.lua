--[[
burst_buffer.lua -- stage a job's data in and out with hpcmove (Slurm's burst_buffer/lua).

A job declares what to move with directives in its batch script:

    #BB_LUA stage_in  [OPTIONS] SRC... DST
    #BB_LUA stage_out [OPTIONS] SRC... DST

OPTIONS are `hpcmove submit` options (-p dtn, --slice-size 1G, ...); SRC and DST follow
`hpcmove submit` (cp/rsync rules); relative paths are taken from the job's working
directory. Words are split at blanks; '...' or "..." keep a word with blanks whole.

  * stage_in runs while the job is pending (slurm_bb_data_in): `hpcmove submit --wait`,
    as the job's user, one directive after the other. The job starts only when every
    stage_in ended Done. If one fails, Slurm holds the job (priority 0) with the reason
    "burst_buffer/lua: slurm_bb_data_in: hpcmove stage_in ...": it never runs. Cancel it,
    fix the cause and submit again.
  * stage_out runs after the job ended (slurm_bb_data_out), the same way; the job stays
    in its stage-out state until the data is in place.

Install: this file and burst_buffer.conf beside slurm.conf, and
BurstBufferType=burst_buffer/lua in slurm.conf (restart slurmctld). Slurm re-reads this
file when it changes. Tried on Slurm 22.05, whose functions get no uid except
slurm_bb_setup: the user is the job's owner as slurmctld knows it (squeue %U), never
anything the job's environment says.

hpcmove runs as that user: through runuser when slurmctld runs as root (SlurmUser=root),
otherwise through `sudo -n -u USER`, which then needs a sudoers rule such as
    slurm ALL=(ALL,!root) NOPASSWD: /usr/bin/env
It runs with the PATH, SLURM_CONF, HPCMOVE_* and locale variables the job was submitted
with (so the job's own hpcmove, job database and settings apply) and the user's HOME.
Root's jobs are refused (Slurm refuses root burst buffers anyway).
--]]

local SCRIPT = "burst_buffer.lua"
-- The hpcmove command: a name looked up in the job's PATH, or an absolute path.
local HPCMOVE = "hpcmove"
local RUNUSER = "/usr/sbin/runuser"
local SUDO = "/usr/bin/sudo"
local ENV = "/usr/bin/env"
-- Variables of the job's submit environment handed to hpcmove (besides HPCMOVE_*).
local PASS = {PATH = true, SLURM_CONF = true, LANG = true, LC_ALL = true, LC_CTYPE = true,
              TZ = true, TMPDIR = true}
local OPS = {stage_in = true, stage_out = true}

-- ------------------------------------------------------------------------------------
-- Pure helpers
-- ------------------------------------------------------------------------------------

-- Split a directive's text into words: blanks separate, '...' and "..." group.
local function words(text)
	local out, word, quote, any = {}, {}, nil, false
	for c in text:gmatch(".") do
		if quote then
			if c == quote then quote = nil else word[#word + 1] = c end
		elseif c == "'" or c == '"' then
			quote, any = c, true
		elseif c:match("%s") then
			if any then out[#out + 1] = table.concat(word) end
			word, any = {}, false
		else
			word[#word + 1], any = c, true
		end
	end
	if quote then return nil, "unbalanced " .. quote end
	if any then out[#out + 1] = table.concat(word) end
	return out
end

-- The #BB_LUA directives of a job script: list of {op=, args=}, or nil and why not.
local function directives(path)
	local f, err = io.open(path, "r")
	if not f then return nil, "cannot read the job script: " .. tostring(err) end
	local found, n = {}, 0
	for line in f:lines() do
		n = n + 1
		local text = line:match("^#BB_LUA%s+(.*)$") or line:match("^#BB_LUA$")
		if text then
			if text:find("[%z\1-\8\10-\31\127]") then
				f:close()
				return nil, "line " .. n .. ": control character in #BB_LUA"
			end
			local w, why = words(text)
			if not w then f:close(); return nil, "line " .. n .. ": " .. why end
			local op = table.remove(w, 1)
			if not OPS[op] then
				f:close()
				return nil, "line " .. n .. ": unknown #BB_LUA directive " .. tostring(op)
					.. " (use stage_in or stage_out)"
			end
			local paths = 0
			for _, a in ipairs(w) do if a:sub(1, 1) ~= "-" then paths = paths + 1 end end
			if paths < 2 then
				f:close()
				return nil, "line " .. n .. ": " .. op .. " needs SRC... DST"
			end
			found[#found + 1] = {op = op, args = w}
		end
	end
	f:close()
	return found
end

-- One word for /bin/sh, whatever it holds.
local function quote(s)
	return "'" .. (s:gsub("'", "'\\''")) .. "'"
end

-- Run argv through /bin/sh; return exit status and output (stdout and stderr).
local function run(argv)
	local q = {}
	for i, a in ipairs(argv) do q[i] = quote(a) end
	local p = io.popen(table.concat(q, " ") .. " 2>&1; echo \"hpcmove-bb-rc=$?\"", "r")
	local out = p:read("*a")
	p:close()
	local rc = tonumber(out:match("hpcmove%-bb%-rc=(%d+)%s*$")) or 255
	return rc, (out:gsub("hpcmove%-bb%-rc=%d+%s*$", ""))
end

local function last_line(text)
	local last = ""
	for line in text:gmatch("[^\n]+") do
		if line:match("%S") then last = line end
	end
	return last
end

-- ------------------------------------------------------------------------------------
-- The job's user and environment
-- ------------------------------------------------------------------------------------

-- (uid, working directory) of the job, from slurmctld.
local function job_owner(job_id)
	local rc, out = run({"squeue", "--noheader", "--states=all", "--jobs=" .. job_id,
	                     "--format=%U|%Z"})
	local uid, dir = out:match("^(%d+)|([^\n]*)")
	if rc ~= 0 or not uid then
		return nil, "cannot find the owner of job " .. job_id .. ": " .. last_line(out)
	end
	return tonumber(uid), dir
end

-- name, home of a uid (getent passwd).
local function passwd(uid)
	local rc, out = run({"getent", "passwd", tostring(uid)})
	local name, home = out:match("^([^:]+):[^:]*:%d+:%d+:[^:]*:([^:]*):")
	if rc ~= 0 or not name then return nil end
	return name, home
end

-- The job's submit environment (the 'environment' file beside its script: a 32-bit
-- count, then NUL-terminated NAME=VALUE strings): the variables hpcmove may see.
local function job_env(job_script)
	local env = {}
	local f = io.open((job_script:gsub("[^/]*$", "")) .. "environment", "rb")
	if not f then return env end
	local data = f:read("*a")
	f:close()
	for item in data:sub(5):gmatch("([^%z]*)%z") do
		local k, v = item:match("^([%w_]+)=(.*)$")
		if k and (PASS[k] or k:match("^HPCMOVE_")) and not v:find("\n") then env[k] = v end
	end
	return env
end

local function euid()
	local _, out = run({"id", "-u"})
	return tonumber(out:match("%d+"))
end

-- ------------------------------------------------------------------------------------
-- Staging
-- ------------------------------------------------------------------------------------

-- Run every `op` directive of the job with hpcmove, as its user, one after the other.
local function stage(op, job_id, job_script)
	local list, why = directives(job_script)
	if not list then return slurm.ERROR, why end
	local todo = {}
	for _, d in ipairs(list) do if d.op == op then todo[#todo + 1] = d end end
	if #todo == 0 then return slurm.SUCCESS end
	local uid, dir = job_owner(job_id)
	if not uid then return slurm.ERROR, dir end
	if uid == 0 then return slurm.ERROR, "hpcmove does not stage data for root's jobs" end
	local name, home = passwd(uid)
	if not name then return slurm.ERROR, "no passwd entry for uid " .. uid end
	local env = job_env(job_script)
	env.HOME, env.USER, env.LOGNAME = home, name, name
	env.PATH = env.PATH or "/usr/local/bin:/usr/bin:/bin"
	for i, d in ipairs(todo) do
		local argv
		if euid() == 0 then argv = {RUNUSER, "-u", name, "--"}
		else argv = {SUDO, "-n", "-u", name, "--"} end
		argv[#argv + 1] = ENV
		argv[#argv + 1] = "-i"
		if dir and dir ~= "" then
			argv[#argv + 1] = "--chdir=" .. dir
		end
		for k, v in pairs(env) do argv[#argv + 1] = k .. "=" .. v end
		for _, a in ipairs({HPCMOVE, "submit", "--wait"}) do argv[#argv + 1] = a end
		for _, a in ipairs(d.args) do argv[#argv + 1] = a end
		slurm.log_info("%s: job %s: %s %d of %d: hpcmove submit --wait %s", SCRIPT, job_id,
		               op, i, #todo, table.concat(d.args, " "))
		local rc, out = run(argv)
		for line in out:gmatch("[^\n]+") do
			slurm.log_info("%s: job %s: %s: %s", SCRIPT, job_id, op, line)
		end
		if rc ~= 0 then
			return slurm.ERROR, string.format("hpcmove %s %d of %d failed (exit %d): %s", op,
			                                  i, #todo, rc, last_line(out))
		end
	end
	return slurm.SUCCESS
end

-- ------------------------------------------------------------------------------------
-- The burst_buffer/lua interface (Slurm 22.05 arguments; all strings)
-- ------------------------------------------------------------------------------------

-- At submission, in slurmctld: must be quick. A malformed directive rejects the job
-- with the reason printed by sbatch.
function slurm_bb_job_process(job_script)
	local list, why = directives(job_script)
	if not list then return slurm.ERROR, why end
	return slurm.SUCCESS
end

-- No pools: hpcmove moves data, it does not allocate space.
function slurm_bb_pools()
	return slurm.SUCCESS
end

function slurm_bb_setup(job_id, uid, gid, pool, bb_size, job_script)
	return slurm.SUCCESS
end

function slurm_bb_data_in(job_id, job_script)
	return stage("stage_in", job_id, job_script)
end

function slurm_bb_real_size(job_id)
	return slurm.SUCCESS
end

function slurm_bb_paths(job_id, job_script, path_file)
	return slurm.SUCCESS
end

function slurm_bb_pre_run(job_id, job_script)
	return slurm.SUCCESS
end

function slurm_bb_post_run(job_id, job_script)
	return slurm.SUCCESS
end

function slurm_bb_data_out(job_id, job_script)
	return stage("stage_out", job_id, job_script)
end

function slurm_bb_job_teardown(job_id, job_script, hurry)
	return slurm.SUCCESS
end

function slurm_bb_get_status(uid, gid, ...)
	return slurm.SUCCESS, "hpcmove stages #BB_LUA stage_in/stage_out directives; "
		.. "`hpcmove list` shows the transfers\n"
end
