-- A realistic history for `kci-tools bench-reads`, generated in bulk on PostgreSQL (not through
-- HTTP): entities :lo to :hi of :total, five KCIs each, with their audit records, history and
-- published outbox events, spread over the weeks before now (two seconds apart).
-- :lo, :hi are entity numbers (1-based); each entity gets 5 KCIs; :total entities in all.
INSERT INTO tracked_entity (entity_type, gateway_id, supplier, status, snapshot, last_sequence_number, last_kci_id,
  last_update_type, last_reason, conversation_id, correlation, flag_gap, flag_illegal, kci_count, first_seen_at, last_kci_at, updated_at)
SELECT (ARRAY['PROVIDE_ORDER','PROVIDE_ORDER','PROVIDE_ORDER','PROVIDE_ORDER','PROVIDE_ORDER','CEASE_ORDER','MODIFY_ORDER','SERVICE_TEST','SERVICE_PROBLEM','PROVIDE_ETHERNET_ORDER'])[n % 10 + 1],
  (1000000 + n)::text, (ARRAY['FIBRECO','OTHERCO','THIRDCO'])[n % 3 + 1],
  (ARRAY['SENT_TO_SUPPLIER','ACKNOWLEDGED','IN_PROGRESS','COMPLETED','COMPLETED','COMPLETED','CANCELLED'])[n % 7 + 1],
  jsonb_build_object('id', 1000000 + n, 'status', 'COMPLETED', 'supplier', 'FIBRECO'), 5,
  ('00000000-0000-4000-8000-' || lpad(to_hex(n * 5), 12, '0'))::uuid, 'INFORMATIONAL', 'UPDATE', 'conv-' || n,
  CASE WHEN n % 4 = 0 THEN 'UNMATCHED' ELSE 'UNSOLICITED' END, n % 50 = 0, n % 200 = 0, 5,
  now() - ((:total - n) * 5 + 4) * interval '2 seconds', now() - (:total - n) * 5 * interval '2 seconds', now() - (:total - n) * 5 * interval '2 seconds'
FROM generate_series(:lo, :hi) AS n ORDER BY n;
-- KCIs k in ((:lo-1)*5+1 .. :hi*5): entity n = (k-1)/5+1, sequence (k-1)%5+1.
INSERT INTO audit_log (request_id, conversation_id, method, path, remote_addr, principal, request_headers, request_body,
  request_body_size, response_status, outcome, kci_id, received_at, duration_ms)
SELECT 'req-' || k, 'conv-' || ((k - 1) / 5 + 1), 'POST', '/kcis', '127.0.0.1', 'fibrecafe',
  jsonb_build_object('x-request-id', 'req-' || k, 'content-type', 'application/json'), NULL, 600, 204, 'ACCEPTED',
  ('00000000-0000-4000-8000-' || lpad(to_hex(k), 12, '0'))::uuid, now() - (:total * 5 - k) * interval '2 seconds', 3
FROM generate_series((:lo - 1) * 5 + 1, :hi * 5) AS k ORDER BY k;
INSERT INTO kci (kci_id, tracked_entity_id, request_id, conversation_id, entity_type, update_type, reason, sequence_number,
  issued_on, received_on, delivered_on, raw_body, headers, outcome, received_at)
SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(k), 12, '0'))::uuid, e.id, 'req-' || k, e.conversation_id, e.entity_type,
  'INFORMATIONAL', 'UPDATE', (k - 1) % 5 + 1, t, t, t,
  json_build_object('id', ('00000000-0000-4000-8000-' || lpad(to_hex(k), 12, '0')), 'supplier', e.supplier, 'sequenceNumber', (k - 1) % 5 + 1,
    'issuedOn', t, 'receivedOn', t, 'deliveredOn', t, 'updateType', 'INFORMATIONAL', 'entityType', e.entity_type,
    'entity', json_build_object('id', e.gateway_id::bigint, 'status', e.status, 'supplier', e.supplier, 'supplierReference', 'SR-' || e.gateway_id,
      'address', json_build_object('line1', '1 Fibre Street', 'town', 'Cafe Town', 'postcode', 'FC1 2AB')),
    'information', json_build_object('type', 'UPDATE', 'message', 'An update about this order'))::text,
  jsonb_build_object('x-request-id', 'req-' || k, 'x-conversation-id', e.conversation_id), 'APPLIED', t
FROM generate_series((:lo - 1) * 5 + 1, :hi * 5) AS k
JOIN tracked_entity e ON e.entity_type = (ARRAY['PROVIDE_ORDER','PROVIDE_ORDER','PROVIDE_ORDER','PROVIDE_ORDER','PROVIDE_ORDER','CEASE_ORDER','MODIFY_ORDER','SERVICE_TEST','SERVICE_PROBLEM','PROVIDE_ETHERNET_ORDER'])[((k - 1) / 5 + 1) % 10 + 1]
  AND e.gateway_id = (1000000 + (k - 1) / 5 + 1)::text
CROSS JOIN LATERAL (SELECT now() - (:total * 5 - k) * interval '2 seconds' AS t) AS at
ORDER BY k;
INSERT INTO state_transition (tracked_entity_id, kci_ref, kci_id, audit_log_id, sequence_number, previous_sequence_number,
  from_status, to_status, applied, update_type, reason, issued_on, received_on, delivered_on, recorded_at)
SELECT c.tracked_entity_id, c.id, c.kci_id, a.id, c.sequence_number, NULLIF(c.sequence_number - 1, 0),
  CASE WHEN c.sequence_number = 1 THEN NULL ELSE 'ACKNOWLEDGED' END, 'IN_PROGRESS', true, 'INFORMATIONAL', 'UPDATE',
  c.received_at, c.received_at, c.received_at, c.received_at
FROM kci c JOIN audit_log a ON a.request_id = c.request_id
WHERE c.kci_id IN (SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(k), 12, '0'))::uuid FROM generate_series((:lo - 1) * 5 + 1, :hi * 5) AS k)
ORDER BY c.id;
INSERT INTO outbox_event (event_id, tracked_entity_id, kci_ref, routing_key, message_type, headers, payload, status,
  attempts, next_attempt_at, created_at, published_at, publish_count)
SELECT ('00000000-0000-4000-9000-' || lpad(to_hex(c.id), 12, '0'))::uuid, c.tracked_entity_id, c.id,
  'kci.' || lower(c.entity_type) || '.informational.update', c.entity_type, c.headers, c.raw_body, 'PUBLISHED', 1,
  c.received_at, c.received_at, c.received_at + interval '40 milliseconds', 1
FROM kci c
WHERE c.kci_id IN (SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(k), 12, '0'))::uuid FROM generate_series((:lo - 1) * 5 + 1, :hi * 5) AS k)
ORDER BY c.id;
