-- A trip booking, as the travel agency's application ran it: one database transaction.
--
-- This is the flow that sagas/trip_booking.yaml replaces: a room at the hotel, a seat on
-- the flight, a car at the rental desk, all or nothing. The transaction held the hotel's
-- and the flight's rows locked until the car was rented; with the hotel, the airline and
-- the rental desk behind their own systems, that is no longer possible.
--
-- The car is rented through the rental desk's own function (`travel.rent_car`): it is
-- paid on the spot and cannot be cancelled, so it is the point of no return.
--
-- `skald scaffold sagas/trip_booking.legacy.sql --name trip_booking` drafts the saga
-- from this file (README, "Migrating a legacy transaction").
--
-- Runnable with psql against the tables created by the saga's `setup:`:
--   psql -v trip_id=trip-1 -v hotel=H-OSLO -v nights=3 -v flight=SK-4411 -v city=oslo \
--        -f sagas/trip_booking.legacy.sql
-- The application checked row counts; the `\if` blocks below do the same.

\set ON_ERROR_STOP on

BEGIN;

-- Take a room at the hotel, only if one is free.
UPDATE travel.hotels
   SET rooms_free = rooms_free - 1
 WHERE hotel_id = :'hotel'
   AND rooms_free >= 1;
SELECT :ROW_COUNT = 1 AS room \gset
\if :room
\else
  \echo 'hotel full: rolling back'
  ROLLBACK;
  \quit
\endif

-- The booking the hotel confirms to the traveller.
INSERT INTO travel.hotel_bookings (trip_id, hotel_id, nights)
VALUES (:'trip_id', :'hotel', :nights)
RETURNING booking_id;

-- Take a seat on the flight, only if one is free.
UPDATE travel.flights
   SET seats_free = seats_free - 1
 WHERE flight_id = :'flight'
   AND seats_free >= 1;
SELECT :ROW_COUNT = 1 AS seat \gset
\if :seat
\else
  \echo 'flight full: rolling back'
  ROLLBACK;
  \quit
\endif

-- The ticket the airline issues.
INSERT INTO travel.flight_tickets (trip_id, flight_id)
VALUES (:'trip_id', :'flight')
RETURNING ticket_id;

-- Rent the car at the desk in the destination city: paid on the spot, not refundable.
SELECT travel.rent_car(:'trip_id', :'city');

COMMIT;
