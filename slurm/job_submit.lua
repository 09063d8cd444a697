--[[
hpcmove site routing: a job_submit/lua plugin script.

hpcmove tags every batch job it submits with the comment "hpcmove:<job id>"
(e.g. "hpcmove:hm-42"). This script routes such jobs to the data-transfer
partition (and, if set, a transfer QOS), so users need not know where
transfers belong and cannot park them on compute nodes by mistake.

Install: copy to the directory of slurm.conf as job_submit.lua, set
  JobSubmitPlugins=lua
in slurm.conf and restart slurmctld. Edit the settings below.
Jobs without the tag are never touched.
]]

local DTN_PARTITION = "dtn"   -- where hpcmove's jobs belong
local TRANSFER_QOS = nil      -- e.g. "xfer"; nil leaves the QOS alone
local FORCE = false           -- true: override a partition the user named

local function is_hpcmove(job_desc)
   local comment = job_desc.comment
   return comment ~= nil and string.sub(comment, 1, 8) == "hpcmove:"
end

function slurm_job_submit(job_desc, part_list, submit_uid)
   if not is_hpcmove(job_desc) then
      return slurm.SUCCESS
   end
   if job_desc.partition == nil or FORCE then
      job_desc.partition = DTN_PARTITION
   end
   if TRANSFER_QOS ~= nil and job_desc.qos == nil then
      job_desc.qos = TRANSFER_QOS
   end
   slurm.log_info("hpcmove: job %s (%s) of uid %u routed to partition %s",
                  tostring(job_desc.name), job_desc.comment, submit_uid, job_desc.partition)
   return slurm.SUCCESS
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
   return slurm.SUCCESS
end

slurm.log_info("hpcmove job_submit.lua loaded")
return slurm.SUCCESS
