-- Argo CD health check for ignis.dev/MicroVM (Lua 5.1, as Argo CD's gopher-lua runs it).
-- It reads the same conditions kstatus reads, plus the phase, and differs from kstatus only
-- where Argo CD has a word kstatus lacks: a VM halted on purpose or finished is Healthy, one
-- suspended on purpose is Suspended, a lost agent is Unknown, and a failure that is being
-- retried (crash loop, image pull error) is Degraded, as Argo CD judges a Pod in
-- CrashLoopBackOff or ImagePullBackOff.
local hs = { status = "Progressing", message = "Waiting for the ignis controller" }

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function said(c)
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end

-- Reasons of Ready=False that mean "on its way", not "something failed and is retried".
local on_the_way = {
  Pending = true, Starting = true, PullingImage = true, Stopping = true,
  Suspending = true, Resuming = true,
}

if obj.metadata.deletionTimestamp ~= nil then
  hs.message = "Deleting: the VM is being stopped"
  return hs
end
if obj.status == nil or obj.status.observedGeneration == nil then
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= obj.metadata.generation then
  hs.message = "Waiting for the ignis controller to observe generation " .. obj.metadata.generation
  return hs
end

local stalled = condition("Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = said(stalled)
  return hs
end

local phase = obj.status.phase
if phase == "Stopped" then
  hs.status = "Healthy"
  hs.message = "Stopped: runPolicy is Halted"
  return hs
end
if phase == "Suspended" then
  -- Argo CD's own word for a resource paused on purpose (a suspended CronJob or Rollout).
  hs.status = "Suspended"
  local suspended = condition("Suspended")
  if suspended ~= nil then
    hs.message = said(suspended)
  else
    hs.message = "Suspended: spec.suspend is true"
  end
  return hs
end
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Succeeded: the run completed"
  return hs
end

local ready = condition("Ready")
if ready ~= nil then
  if ready.status == "True" then
    hs.status = "Healthy"
    hs.message = said(ready)
    return hs
  end
  if ready.status == "Unknown" then
    hs.status = "Unknown"
    hs.message = said(ready)
    return hs
  end
  if phase == "Failed" then
    hs.status = "Degraded"
    hs.message = said(ready)
    return hs
  end
  if on_the_way[ready.reason] then
    hs.message = said(ready)
    return hs
  end
  hs.status = "Degraded"
  hs.message = said(ready)
  return hs
end

local reconciling = condition("Reconciling")
if reconciling ~= nil and reconciling.status == "True" then
  hs.message = said(reconciling)
end
return hs
