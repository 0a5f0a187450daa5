-- Seed 004's review workflow for Luanette: a flow for a generated (latent) garden region.
--
--   draft --submit--> pending_review --approve--> approved        (final: garden.approve)
--     |                 |  |--request_changes--> needs_changes --resubmit--> pending_review
--     |                 |--reject--> draft                          |--discard--> discarded
--     |--discard--> discarded (final)
--
-- Load it as a plugin (--plugins DIR, or store it and `luanette-cli plugin load HASH`),
-- then `luanette-cli flow register review_flow`, and start one per region:
-- `luanette-cli flow start review_workflow --subject REGION --context '{"region_id": "REGION"}'`.
-- Guards and handlers run like plugin hooks: each call is a fresh sandboxed run with
-- the capabilities describe() declares; what they keep goes in the flow's context.

local ReviewWorkflow = {}

function ReviewWorkflow.describe()
  return {
    name = "review_flow",
    description = "Review of generated regions: submit, approve (not your own), request changes, discard",
    tags = { "plugin" },
    capabilities = { "garden.write" },   -- onApproved approves the region in the garden
  }
end

-- A plugin: it subscribes to no event, it only defines a flow.
function ReviewWorkflow.init(ctx) end

-- Guard: nobody approves their own submission.
function ReviewWorkflow.canApprove(ctx, event)
  local submitter = ctx:context().submitter
  if submitter == ctx:current_user() then
    return false, "you cannot approve your own submission"
  end
  return true
end

function ReviewWorkflow.onEnterDraft(ctx, event)
  if ctx:context().comments == nil then ctx:set_context("comments", {}) end
  ctx:log("info", "review of " .. ctx:subject() .. " is a draft")
end

function ReviewWorkflow.onEnterPending(ctx, event)
  ctx:set_context("submitter", ctx:current_user())
  ctx:set_context("submitted_at", ctx:now())
  ctx:emit("notification:review_requested", { region = ctx:subject(), submitter = ctx:current_user() })
end

function ReviewWorkflow.onExitPending(ctx, event)
  if event.comment then
    local comments = ctx:context().comments or {}
    comments[#comments + 1] = { by = event.user, text = event.comment }
    ctx:set_context("comments", comments)
  end
end

-- The approval is the garden's: the region's content becomes what it plays.
function ReviewWorkflow.onApproved(ctx, event)
  local region_id = ctx:context().region_id
  if region_id then
    garden.approve(region_id, event.decided_by or ctx:context().reviewer_id)
  end
  ctx:set_context("approved_at", ctx:now())
  ctx:set_context("approver", event.user)
  ctx:emit("workflow:completed", { workflow = "review", result = "approved", region = ctx:subject() })
end

function ReviewWorkflow.define()
  return {
    id = "review_workflow",
    initial = "draft",
    states = {
      draft = {
        on = { submit = "pending_review", discard = "discarded" },
        enter = "onEnterDraft",
      },
      pending_review = {
        on = { approve = "approved", reject = "draft", request_changes = "needs_changes" },
        enter = "onEnterPending",
        exit = "onExitPending",
        guards = { approve = "canApprove" },
      },
      needs_changes = {
        on = { resubmit = "pending_review", discard = "discarded" },
      },
      approved = { type = "final", enter = "onApproved" },
      discarded = { type = "final" },
    },
    context = { comments = {} },
  }
end

return ReviewWorkflow
