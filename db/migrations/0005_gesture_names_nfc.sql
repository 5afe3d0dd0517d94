-- Existing data brought in line with two rules the code now follows (semg.repo):
-- 1. Gesture names are NFC. Names stored before were kept as typed: a name typed with decomposed accents
--    (macOS) no longer matched its own bank entry once the code looked it up NFC (no session could be planned
--    with it: "not in this user's gesture bank"). Each such name, its intervals' labels and its sessions' plans
--    become NFC, unless another gesture of the user has the same NFC name (two gestures then, left as they are).
-- 2. Only intervals linked to a gesture of the bank train. Before, deleting a gesture unlinked its intervals and
--    adding one of the same name did not link them again (they trained by their label): such intervals are the
--    re-added gesture's, as add_gesture now makes them.
DO $$
BEGIN
    IF current_setting('server_encoding') = 'UTF8' THEN  -- normalize() needs it
        UPDATE gestures g SET name = normalize(g.name, NFC)
        WHERE g.name IS NOT NFC NORMALIZED
          AND NOT EXISTS (SELECT 1 FROM gestures o WHERE o.user_id = g.user_id AND o.id <> g.id
                            AND normalize(o.name, NFC) = normalize(g.name, NFC));
        UPDATE session_intervals i SET label = normalize(i.label, NFC)
        WHERE i.kind = 'gesture' AND i.label IS NOT NFC NORMALIZED
          AND (i.gesture_id IS NULL
               OR EXISTS (SELECT 1 FROM gestures g WHERE g.id = i.gesture_id AND g.name = normalize(i.label, NFC)));
        UPDATE capture_sessions s SET plan = jsonb_set(s.plan, '{gestures}', (
                SELECT coalesce(jsonb_agg(CASE WHEN e.x IS NFC NORMALIZED
                                                 OR EXISTS (SELECT 1 FROM gestures g
                                                            WHERE g.user_id = s.user_id AND g.name = e.x)
                                               THEN e.x ELSE normalize(e.x, NFC) END ORDER BY e.o), '[]'::jsonb)
                FROM jsonb_array_elements_text(s.plan->'gestures') WITH ORDINALITY AS e(x, o)))
        WHERE jsonb_typeof(s.plan->'gestures') = 'array'
          AND EXISTS (SELECT 1 FROM jsonb_array_elements_text(s.plan->'gestures') AS e(x)
                      WHERE e.x IS NOT NFC NORMALIZED);
    END IF;
END
$$;
UPDATE session_intervals i SET gesture_id = g.id
FROM capture_sessions s, gestures g
WHERE i.kind = 'gesture' AND i.gesture_id IS NULL AND s.id = i.session_id AND g.user_id = s.user_id
  AND g.name = i.label;
