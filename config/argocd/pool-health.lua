-- Argo CD health check for ignis.dev/MicroVMPool (Lua 5.1, as Argo CD's gopher-lua runs it).
-- The same conditions kstatus reads: Stalled (a warm VM failed for good) is Degraded, a full
-- pool (Ready) is Healthy, anything else is the pool filling.
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

if obj.metadata.deletionTimestamp ~= nil then
  hs.message = "Deleting"
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
  hs.message = stalled.reason .. ": " .. stalled.message
  return hs
end
local ready = condition("Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message
  return hs
end
if ready ~= nil then
  hs.message = ready.reason .. ": " .. ready.message
end
return hs
